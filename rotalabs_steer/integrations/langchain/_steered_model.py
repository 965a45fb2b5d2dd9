"""What SteeredLLM and SteeredChatModel share: their fields, the model they load, the
vectors they steer with, run-time strength controls, and one generate call."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ...extraction.batching import pad_token_id
from ...model_control import input_device
from ...steering import MultiVectorInjector
from ...validation import check_choice, check_strength
from ...vectors import SteeringVector, SteeringVectorSet

# Kept for the reference's import path; each vector is applied at its own file's layer_index.
DEFAULT_LAYER = 14

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device(device: str) -> str:
    """``"auto"``: Apple's MPS, else CUDA, else the CPU (the reference's order)."""
    if device != "auto":
        return device
    if torch.backends.mps.is_available():
        return "mps"
    return "cuda" if torch.cuda.is_available() else "cpu"


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string (LangChain's contract for ``stop``)."""
    ends = [i for i in (text.find(s) for s in stop or () if s) if i >= 0]
    return text[:min(ends)] if ends else text


class SteeredModelFields(BaseModel):
    """The fields and steering controls of the reference's two LangChain wrappers."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = Field(description="HuggingFace model name or local folder")
    steering_configs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="{behavior: {'vector_path': ..., 'strength': 1.0}}")
    device: str = Field(default="auto", description="device_map for loading: auto, cuda, mps, cpu, ...")
    torch_dtype: str = Field(default="float16", description="float16, float32 or bfloat16")
    max_new_tokens: int = Field(default=256, description="tokens to generate")
    temperature: float = Field(default=0.7, description="sampling temperature (used when do_sample)")
    do_sample: bool = Field(default=True, description="sample (True) or decode greedily (False)")

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _vectors: dict[str, SteeringVector] = PrivateAttr(default_factory=dict)
    _injector: MultiVectorInjector | None = PrivateAttr(default=None)
    _initialized: bool = PrivateAttr(default=False)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._initialize()

    def _initialize(self) -> None:
        """Load the tokenizer, the model and the configured vectors (once)."""
        if self._initialized:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_choice(self.torch_dtype, tuple(DTYPES), "torch_dtype")
        strengths: dict[str, float] = {}
        for behavior, config in self.steering_configs.items():
            where = f"steering_configs[{behavior!r}]"
            if not isinstance(config, dict) or "vector_path" not in config:
                raise ValueError(f"{where} must be a dict with a 'vector_path' (and optionally 'strength')")
            strengths[behavior] = check_strength(config.get("strength", 1.0), f"{where}['strength']")
            self._vectors[behavior] = SteeringVector.load(Path(config["vector_path"]))
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self._model = AutoModelForCausalLM.from_pretrained(
            self.model_name, dtype=DTYPES[self.torch_dtype], device_map=pick_device(self.device),
            low_cpu_mem_usage=True)
        self._rebuild_injector(strengths)
        self._initialized = True

    def _rebuild_injector(self, strengths: dict[str, float]) -> None:
        # one single-vector set per behaviour; MultiVectorInjector moves each vector to the
        # device and dtype of the block it steers
        sets = {b: SteeringVectorSet(v.behavior, [v]) for b, v in self._vectors.items()}
        self._injector = MultiVectorInjector(self._model, sets, strengths) if sets else None

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "steering_configs": self.steering_configs}

    def _generate_text(self, prompt: str, stop: Sequence[str] | None, add_special_tokens: bool,
                       **kwargs: Any) -> str:
        """The reply to ``prompt``: generated tokens only, decoded, cut at ``stop``, stripped."""
        self._initialize()
        inputs = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
        inputs = inputs.to(input_device(self._model))
        do_sample = kwargs.get("do_sample", self.do_sample)
        options: dict[str, Any] = {
            "max_new_tokens": kwargs.get("max_new_tokens", self.max_new_tokens),
            "do_sample": do_sample,
            "pad_token_id": pad_token_id(self._tokenizer),
        }
        if do_sample:
            options["temperature"] = kwargs.get("temperature", self.temperature)
        if stop:
            options.update(stop_strings=list(stop), tokenizer=self._tokenizer)
        with torch.no_grad(), self._injector or nullcontext():
            output = self._model.generate(**inputs, **options)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return cut_at_stop(self._tokenizer.decode(new_tokens, skip_special_tokens=True), stop).strip()

    # --- strength controls ------------------------------------------------------------------

    def _known(self, behavior: str) -> None:
        if behavior not in self._vectors:
            raise KeyError(f"no steering vector for behavior {behavior!r}; "
                           f"known: {sorted(self._vectors)} (add one with add_vector)")

    def set_strength(self, behavior: str, strength: float) -> None:
        """Change the strength of ``behavior`` (0 turns it off); takes effect on the next call."""
        self._known(behavior)
        self._injector.set_strength(behavior, strength)

    def get_strength(self, behavior: str) -> float:
        """The current strength of ``behavior`` (0.0 for a behaviour without a vector)."""
        return self._injector.get_strength(behavior) if self._injector is not None else 0.0

    def disable_steering(self, behavior: str | None = None) -> None:
        """Strength 0 for ``behavior``, or for every behaviour when None."""
        for name in list(self._vectors) if behavior is None else [behavior]:
            self.set_strength(name, 0.0)

    def enable_steering(self, behavior: str, strength: float = 1.0) -> None:
        """Set ``behavior`` back to ``strength``."""
        self.set_strength(behavior, strength)

    def add_vector(self, behavior: str, vector: SteeringVector | str | Path, strength: float = 1.0) -> None:
        """Steer with another vector (a SteeringVector or a path to one); other strengths are kept."""
        self._initialize()
        strength = check_strength(strength)
        if isinstance(vector, (str, Path)):
            vector = SteeringVector.load(vector)
        if not isinstance(vector, SteeringVector):
            raise TypeError(f"vector must be a SteeringVector or a path, not {type(vector).__name__}")
        strengths = {b: self.get_strength(b) for b in self._vectors}
        self._vectors[behavior] = vector
        self._rebuild_injector({**strengths, behavior: strength})
