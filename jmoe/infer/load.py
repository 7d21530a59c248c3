"""Open a model for generation: a jmoe run directory or a Hugging Face model directory.

`open_model` reads only what describes the model (its config and tokenizer), so that
callers can check their input before the weights are read; `ModelSource.load` then reads
the weights. `load(path)` does both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from jmoe.infer.engine import Engine, Generation, GenerationStats
from jmoe.infer.forward import check_servable
from jmoe.infer.sampling import SamplingParams
from jmoe.infer.tokenizer import Tokenizer, load_tokenizer
from jmoe.nn.task_head import as_task
from jmoe.nn.transformer import LMConfig


def encode_prompt(tokenizer: Tokenizer, text: str, *, chat: bool = False) -> list[int]:
    """A prompt's ids; with `chat`, `text` is the user's message, put in the model's chat
    template with the generation prompt after it (ValueError when it has no template)."""
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenizer.encode_chat(rendered)
    return tokenizer.encode(text)


@dataclasses.dataclass
class Model:
    """A model ready to generate: config, parameters, router state and tokenizer.

    source: the directory it came from; kind: "run" or "hf"; step: the run's checkpoint.
    """

    cfg: LMConfig
    params: dict
    state: dict
    tokenizer: Tokenizer | None
    source: str = ""
    kind: str = "run"
    step: int | None = None
    _engine: Engine | None = dataclasses.field(default=None, repr=False)

    def engine(self, batch_size: int = 32, contrast=None) -> Engine:
        """The model's generation engine (kept, with its compiled steps, between calls);
        contrast: self-contrast decoding (`jmoe.infer.contrast.SelfContrast`) or None."""
        if self._engine is None or self._engine.batch_size != batch_size or self._engine.contrast != contrast:
            self._engine = Engine(self.cfg, self.params, self.state, batch_size=batch_size, contrast=contrast)
        return self._engine

    def for_task(self, name: str) -> "Model":
        """The model running as task `name` of its task head (`jmoe.nn.task_head`)."""
        return dataclasses.replace(self, cfg=as_task(self.cfg, name, self.source or "the model"), _engine=None)

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """A prompt's ids (see `encode_prompt`)."""
        return encode_prompt(self._tokenizer(), text, chat=chat)

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        chat: bool = False,
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Sequence[int] | None = None,
        seed: int = 0,
        truncate: bool = False,
        batch_size: int = 32,
        on_token: Callable[[int, int], None] | None = None,
        progress: bool = False,
    ) -> list[str] | str:
        """Continue text prompts; returns the generated text (one string per prompt, or one
        string for a single prompt given as a string).

        stop_ids: ids that end a generation (default: the tokenizer's end-of-sequence ids).
        Other arguments as `Engine.generate`.
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = [self.encode(t, chat=chat) for t in texts]
        gens, _ = self.generate_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                                    seed=seed, truncate=truncate, batch_size=batch_size, on_token=on_token,
                                    progress=progress)
        out = [self.tokenizer.decode(g.token_ids) for g in gens]
        return out[0] if single else out

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int] | None = None,
                     batch_size: int = 32, **kwargs) -> tuple[list[Generation], GenerationStats]:
        """`Engine.generate` on token ids, with the tokenizer's end-of-sequence ids as the
        default stop ids."""
        if stop_ids is None:
            stop_ids = self.tokenizer.eos_ids if self.tokenizer is not None else ()
        return self.engine(batch_size).generate(prompts, stop_ids=stop_ids, **kwargs)

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.source} was opened without a tokenizer; pass token ids (generate_ids)")
        return self.tokenizer


@dataclasses.dataclass
class ModelSource:
    """A model directory opened without its weights: `cfg`, `tokenizer`, and `load()`.

    task_experts: the PreMoe statistics stored with a run (`jmoe compress --method premoe`),
    or None.
    """

    path: Path
    kind: str
    cfg: LMConfig
    tokenizer: Tokenizer | None
    step: int | None
    _load: Callable[[], tuple[LMConfig, dict, dict, int | None]] = dataclasses.field(repr=False, default=None)
    task_experts: object = None

    def check_subset(self, subset: str | None) -> None:
        """ValueError unless `subset` ("auto", "all", None or a task name) can be served."""
        if subset in (None, "auto", "all"):
            return
        if self.task_experts is None:
            raise ValueError(f"--expert-subset {subset}: {self.path} has no PreMoe task statistics "
                             "(jmoe compress --method premoe stores them)")
        self.task_experts._index(subset)

    def load(self) -> Model:
        """Read the weights (and router state)."""
        cfg, params, state, step = self._load()
        return Model(cfg=cfg, params=params, state=state, tokenizer=self.tokenizer, source=str(self.path),
                     kind=self.kind, step=step)


def with_router_options(cfg: LMConfig, options: dict | None, flag: str = "--router-option") -> LMConfig:
    """cfg with `options` merged into every MoE layer's router options (e.g. THOR's
    {"inference": "ensemble"}), checked by the router's own options; ValueError naming `flag`."""
    if not options:
        return cfg
    if not cfg.moe_layers:
        raise ValueError(f"{flag}: the model has no MoE layers")
    try:
        return cfg.with_moe(router_options={**cfg.moe.router_options.to_dict(), **options})
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def open_model(path: str | Path, *, step: int | None = None, tokenizer: bool = True,
               skip_ratio: float | None = None, router_options: dict | None = None) -> ModelSource:
    """Describe the model at `path` without reading its weights.

    path: a jmoe run directory (byte-level tokenizer; `step` picks a checkpoint, default the
      newest complete one) or a Hugging Face model directory (config.json, safetensors, and
      tokenizer.json when `tokenizer`).
    skip_ratio: run with online expert skipping at this ratio (`MoEConfig.skip_ratio`)
      instead of the model's own setting.
    router_options: router options to run with instead of the model's (`with_router_options`).
    Raises ValueError (one line) when the directory is neither, its config or tokenizer is
    missing or broken, or its router cannot decode token by token.
    """
    source = _open(path, step, tokenizer)
    if router_options:
        cfg = with_router_options(source.cfg, router_options)
        load_plain = source._load

        def load_with_options():
            cfg, params, state, at = load_plain()
            return with_router_options(cfg, router_options), params, state, at

        source = dataclasses.replace(source, cfg=cfg, _load=load_with_options)
    if skip_ratio is None:
        return source
    if not source.cfg.moe_layers:
        raise ValueError(f"--skip-ratio: {path} has no MoE layers whose experts could be skipped")
    if not 0.0 <= skip_ratio <= 1.0:
        raise ValueError(f"skip_ratio={skip_ratio} must be in [0, 1]")
    load_weights = source._load

    def load_skipping():
        cfg, params, state, at = load_weights()
        return cfg.with_moe(skip_ratio=skip_ratio), params, state, at

    return dataclasses.replace(source, cfg=source.cfg.with_moe(skip_ratio=skip_ratio), _load=load_skipping)


def _open(path, step, tokenizer) -> ModelSource:
    from jmoe.train import rundir

    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ValueError(f"{path} {what} (want a jmoe run or a Hugging Face model directory)")
    if rundir.is_run_dir(path):
        saved, chosen = rundir.find_checkpoint(path, step)
        cfg = LMConfig.from_dict(saved["model"])
        check_servable(cfg)

        def load_run():
            model_cfg, _, params, router_state, _, at = rundir.load_run(path, chosen)
            return model_cfg, params, router_state or {}, at

        tok = None
        if tokenizer:  # its own, or that of the model it was trained from (a Hugging Face model's)
            tok = load_tokenizer(rundir.tokenizer_dir(path), vocab_size=cfg.vocab_size)
        task_experts = None
        if "premoe" in saved:
            from jmoe.merge.experts.premoe import FILE, TaskExperts

            task_experts = TaskExperts.load(path / FILE)
        return ModelSource(path, "run", cfg, tok, chosen, load_run, task_experts)
    if (path / "config.json").is_file():
        from jmoe.io import hf
        from jmoe.nn.transformer import lm_state_from_params

        if step is not None:
            raise ValueError(f"{path} is a Hugging Face model directory; it has no checkpoint steps")
        _, cfg, _ = hf.read_config(path)
        check_servable(cfg)
        tok = load_tokenizer(path) if tokenizer else None

        def load_hf():
            model_cfg, params = hf.load(path)
            return model_cfg, params, lm_state_from_params(model_cfg, params), None

        return ModelSource(path, "hf", cfg, tok, None, load_hf)
    raise ValueError(f"{path} is neither a jmoe run (config.json and checkpoints/) nor a Hugging Face model "
                     "directory (config.json)")


def select_experts(model: Model, task_experts, subset: str | None, prompts: Sequence[Sequence[int]] = ()) -> tuple[Model, str | None]:
    """(the model with a PreMoe task's experts only, the task) for `subset`: a task name, or
    "auto"/None to retrieve the task nearest to `prompts` (token ids); "all" or a model without
    task statistics: (model, None)."""
    if task_experts is None or subset == "all":
        return model, None
    from jmoe.merge.experts.premoe import prune_router_state, prune_to, task_scores

    if subset in (None, "auto"):
        if not prompts:
            raise ValueError("retrieving a PreMoe task needs prompts")
        query = task_scores(model.params, model.cfg, prompts, router_state=model.state or None, k=task_experts.k,
                            threshold=task_experts.threshold, score=task_experts.score, first_only=True)[0]
        subset = task_experts.retrieve(query)
    kept = task_experts.kept(subset)
    params, cfg = prune_to(model.params, model.cfg, kept)
    pruned = Model(cfg=cfg, params=params, state=prune_router_state(model.state, kept), tokenizer=model.tokenizer,
                   source=model.source, kind=model.kind, step=model.step)
    return pruned, subset


def load(path: str | Path, *, step: int | None = None, tokenizer: bool = True,
         skip_ratio: float | None = None) -> Model:
    """`open_model(path, ...).load()`: a `Model` ready to generate."""
    return open_model(path, step=step, tokenizer=tokenizer, skip_ratio=skip_ratio).load()
