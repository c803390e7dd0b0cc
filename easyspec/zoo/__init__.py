"""easyspec's own model zoo: same-family base/draft pairs trained on Python source.

No model can be downloaded on the machines easyspec is developed and tested on,
and acceptance rates only mean something with a draft that predicts its base.
`python -m easyspec.zoo train-pair` builds both from the Python sources already
on the machine; see easyspec.zoo.cli for the commands.
"""
