"""The base/draft pairs the zoo trains: shapes, data caps and optimiser settings.

Both models of a pair share one tokenizer and one corpus, so the draft learns
to predict what its base predicts. Head counts divide by 4 so that the base (and
the draft, for the TP=N draft baseline) can be split over 2 or 4 ranks by
tensor parallelism.

demo:  committed to the repository, so both bf16 checkpoints together must
       stay under 24 MiB (about 11.7M parameters, tied embeddings counted once).
bench: a few hundred million parameters for GPU benchmarks, trained at
       benchmark time (one model per GPU) and never committed. Its draft
       trains on exactly the base's batches (the same step count, the same
       seed), as the members of a model family share their training data.
       Models this small cost time per layer, not per weight, on a GPU, so
       base and draft share a width and the base is almost three times as
       deep: a draft step costs about a third of a base step at TP=2. The
       two-minute box starves both of data: on 2 H100s they end at about the
       same held-out loss (4.25 and 4.21 nats/token after 634 steps of 16k
       tokens), so this pair measures cost ratios faithfully and acceptance
       only roughly.
"""

from __future__ import annotations

from dataclasses import dataclass

from easyspec.model.config import ModelConfig
from easyspec.zoo.bpe import BOS_ID, EOS_ID


@dataclass(frozen=True)
class TrainSettings:
    seq_len: int
    batch_size: int  # windows per step; tokens per step = batch_size * seq_len
    lr: float  # peak AdamW learning rate
    warmup_steps: int  # capped at a tenth of the run for short runs
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250  # steps between validation passes (one more at the end)
    eval_windows: int = 64  # held-out windows of seq_len per validation pass


@dataclass(frozen=True)
class ModelSpec:
    role: str  # "base" or "draft": the output sub-folder
    config: ModelConfig
    train: TrainSettings


@dataclass(frozen=True)
class PairSpec:
    name: str
    vocab_size: int
    corpus_max_bytes: int  # cap on the source bytes read (train + held out)
    tokenizer_max_chars: int  # BPE is trained on this much of the train split
    default_minutes: float  # training time per model when neither --minutes nor --steps is given
    base: ModelSpec
    draft: ModelSpec
    draft_follows_base: bool = False  # a --minutes budget sizes the base; the draft takes its step count

    def __post_init__(self) -> None:
        base, draft = self.base.train, self.draft.train
        if self.draft_follows_base and (base.batch_size, base.seq_len) != (draft.batch_size, draft.seq_len):
            # The same step count and seed give the same batches only at the same batch shape.
            raise ValueError(f"pair {self.name}: a draft that follows its base needs the base's batch_size "
                             f"and seq_len")


def _llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
           context: int) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=context,  # the training context: RoPE is untested beyond it
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
    )


_DEMO_VOCAB, _DEMO_CONTEXT = 4096, 1024
_BENCH_VOCAB, _BENCH_CONTEXT = 16384, 2048

PAIRS: dict[str, PairSpec] = {
    "demo": PairSpec(
        name="demo",
        vocab_size=_DEMO_VOCAB,
        corpus_max_bytes=96 << 20,
        tokenizer_max_chars=24_000_000,
        default_minutes=1.1,
        # 8.69M parameters, 16.6 MiB in bf16.
        base=ModelSpec("base", _llama(_DEMO_VOCAB, 320, 640, 8, 8, 4, _DEMO_CONTEXT),
                       TrainSettings(seq_len=_DEMO_CONTEXT, batch_size=32, lr=2e-3, warmup_steps=100)),
        # 2.99M parameters, 5.7 MiB in bf16.
        draft=ModelSpec("draft", _llama(_DEMO_VOCAB, 160, 448, 8, 4, 2, _DEMO_CONTEXT),
                        TrainSettings(seq_len=_DEMO_CONTEXT, batch_size=32, lr=3e-3, warmup_steps=100)),
    ),
    "bench": PairSpec(
        name="bench",
        vocab_size=_BENCH_VOCAB,
        corpus_max_bytes=128 << 20,
        tokenizer_max_chars=32_000_000,
        default_minutes=2.5,
        # 214M parameters, 408 MiB in bf16.
        base=ModelSpec("base", _llama(_BENCH_VOCAB, 768, 2048, 32, 12, 4, _BENCH_CONTEXT),
                       TrainSettings(seq_len=_BENCH_CONTEXT, batch_size=8, lr=1.5e-3, warmup_steps=50)),
        # 88.1M parameters, 168 MiB in bf16.
        draft=ModelSpec("draft", _llama(_BENCH_VOCAB, 768, 2048, 12, 12, 4, _BENCH_CONTEXT),
                        TrainSettings(seq_len=_BENCH_CONTEXT, batch_size=8, lr=2e-3, warmup_steps=50)),
        draft_follows_base=True,
    ),
}
