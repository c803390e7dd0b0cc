from easyspec.cli.main import main

main()
