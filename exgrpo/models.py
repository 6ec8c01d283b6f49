"""Models: load a local causal LM, wrap it in LoRA, build the tiny embedded student, and expose what
the fused kernels need (final hidden states + the LM-head weight) without ever computing logits.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
END_OF_TURN = "<end_of_turn>"


class ModelError(ValueError):
    pass


# ----------------------------------------------------------------------------- loading

def check_model_dir(path: str | Path) -> Path:
    """Fail before any compute on a directory that cannot be a model."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"model directory not found: {p}")
    if not (p / "config.json").exists():
        raise ModelError(f"{p} has no config.json: not a transformers model directory")
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin")) + list(p.glob("adapter_model.*"))
    if not weights:
        raise ModelError(f"{p} has a config but no weights (*.safetensors / *.bin)")
    check_family(p / "config.json")
    for w in sorted(p.glob("*.safetensors")):
        if (why := safetensors_damage(w)) is not None:
            raise ModelError(f"{w} is damaged ({why}); copy or download it again")
    return p


def check_family(config_json: Path) -> dict:
    """The config (a dict), when its model_type names a decoder-only causal LM (Gemma, Llama, Qwen, ...); an encoder
    (BERT-like: it has a masked-LM head in transformers), an encoder-decoder or an unknown type is an error."""
    import json

    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )
    try:
        cfg = json.loads(config_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeError) as e:
        raise ModelError(f"{config_json} is not a JSON config ({e})") from None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not isinstance(kind, str):
        raise ModelError(f"{config_json} names no model_type: not a transformers model config")
    if cfg.get("is_encoder_decoder") or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
            or kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        what = ("an encoder-decoder" if cfg.get("is_encoder_decoder") else
                "an encoder" if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "not a causal language model")
        raise ModelError(f"{config_json}: model_type {kind!r} is {what}; exgrpo trains and samples decoder-only "
                         "chat models (gemma, llama, qwen2, mistral, ...)")
    return cfg


def from_pretrained_checked(path: str | Path, **kwargs):
    """AutoModelForCausalLM.from_pretrained, refusing weights that do not fit config.json (a tensor the
    config needs missing from the files, or of another shape: a config from another model, which
    transformers would fill with random values and only warn about)."""
    from transformers import AutoModelForCausalLM
    # ignore_mismatched_sizes: report wrong shapes here, by name, instead of transformers' RuntimeError.
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                       ignore_mismatched_sizes=True, **kwargs)
    missing, wrong = sorted(info.get("missing_keys") or ()), sorted(info.get("mismatched_keys") or ())
    if missing or wrong:
        parts = [f"{len(missing)} tensor(s) missing from the weight files ({_first(missing)})"] if missing else []
        parts += [f"{len(wrong)} of another shape ({_first(wrong)})"] if wrong else []
        raise ModelError(f"{path}: the weights do not fit config.json (model_type "
                         f"{model.config.model_type!r}): {'; '.join(parts)}. Is config.json from another model?")
    if unused := sorted(info.get("unexpected_keys") or ()):
        print(f"warning: {path}: {len(unused)} tensor(s) in the weight files are not used by the model "
              f"({_first(unused)})", file=sys.stderr)
    return model


def _first(keys: list, n: int = 3) -> str:
    names = [str(k[0] if isinstance(k, tuple) else k) for k in keys]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def safetensors_damage(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (its header unreadable, or its tensors reaching past the end of
    the file: a truncated copy), read from the header alone; None when it looks whole."""
    import json
    import struct
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"its header claims {n} bytes but the file has {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its header is not JSON"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if ends and 8 + n + max(ends) > size:
        return f"{size} bytes, but its tensors need {8 + n + max(ends)} (truncated)"
    return None


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"the tokenizer in {path} has no chat template: dialogues cannot be rendered")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
# Implementations that take a packed row's sequence boundaries from its position ids and skip the attention
# between sequences: packed micro-batches go in one row for them (exgrpo.batching).
VARLEN_ATTENTION = ("flash_attention_2", "flex_attention")


def attention_for(attention: str, dtype: torch.dtype, device: str | torch.device) -> str:
    """The attention implementation to load: "auto" is flash_attention_2 on CUDA in bf16/fp16 when flash-attn
    is installed (packed rows then pass sequence boundaries, no [T, T] mask), else sdpa (packed rows get a
    block-diagonal boolean mask, so they are kept as wide as the longest sequence). flex_attention (torch's
    FlexAttention, compiled; block-sparse over a packed row) is there to be asked for."""
    import importlib.util
    if attention not in ATTENTION:
        raise ModelError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if attention not in ("auto", "flash_attention_2"):
        return attention
    installed = importlib.util.find_spec("flash_attn") is not None
    runs = torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if attention == "auto":
        return "flash_attention_2" if installed and runs else "sdpa"
    if not installed:
        raise ModelError("attention='flash_attention_2' needs flash-attn (pip install 'exgrpo[gpu]')")
    if not runs:
        raise ModelError(f"flash_attention_2 runs on CUDA in bf16/fp16, not {torch.device(device).type} {dtype}")
    return attention


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attention: str = "sdpa"):
    path = check_model_dir(path)
    model = from_pretrained_checked(path, dtype=dtype, attn_implementation=attention_for(attention, dtype, device))
    return model.to(device)


def add_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules=None):
    from peft import LoraConfig, get_peft_model
    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_mode(model):
    """The SFT checkpoint's policy: a LoRA model with its adapters disabled (no second copy)."""
    if is_lora(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


# ----------------------------------------------------------------------------- hidden states + head

def _base_and_causal(model):
    """(decoder that returns final hidden states, the CausalLM module) for plain and peft models."""
    causal = model.get_base_model() if is_lora(model) else model
    return causal.model, causal


def lm_head(model) -> tuple[torch.Tensor, float | None]:
    """The LM-head weight [V, H] (the tied input embedding for Gemma) and the final logit softcap."""
    _, causal = _base_and_causal(model)
    head = causal.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ModelError("LM heads with a bias are not supported by the fused kernels")
    cfg = causal.config
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    return head.weight, softcap


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states [B, L, H]: the decoder without its LM head, so no [B, L, V] logits.
    Packed rows: attention_mask None and position_ids restarting at 0 for each sequence, from which
    transformers masks attention to within each sequence."""
    decoder, _ = _base_and_causal(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def context_length(model) -> int:
    _, causal = _base_and_causal(model)
    return int(getattr(causal.config, "max_position_embeddings", 1 << 30))


# ----------------------------------------------------------------------------- the tiny student

TINY_SIZES = {
    # hidden, layers, heads, kv heads, head_dim, intermediate
    "tiny": (64, 2, 4, 1, 16, 256),
    "small": (128, 4, 4, 2, 32, 512),
    "shallow": (128, 2, 4, 2, 32, 512),     # "small" with half the layers: the demo's default
}


def prompt_phrases() -> list[str]:
    """The fixed texts the trainer itself writes into prompts: every answer-format instruction of the task
    registry, the probe rules' answer instruction, and the chat template's role headers. Byte-level BPE
    cannot merge across words, so each would cost a token a word (about 40 a turn) in every sequence."""
    from exgrpo.probes.rules import load_rules
    from exgrpo.tasks.registry import INSTRUCTIONS
    return [*INSTRUCTIONS.values(), load_rules().answer_instruction, "user\n", "model\n"]


def build_tokenizer(corpus: list[str], vocab_size: int = 800):
    """A byte-level BPE trained on `corpus`, wrapped as a transformers fast tokenizer with a Gemma-style
    chat template. Numbers are pre-tokenised whole with their leading space (" 17"), so the frequent ones
    are one token each: a tiny model reads "8 + 3 = 11" as five tokens, and an operand is one lookup.
    Each of `prompt_phrases()` is one (non-special) added token: a tiny model's sequences are then its
    content, not the boilerplate around it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tk.add_tokens([AddedToken(p, normalized=False, special=False) for p in prompt_phrases()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token=END_OF_TURN,
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<start_of_turn>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_student(out_dir: str | Path, corpus: list[str], *, size: str = "tiny", seed: int = 0,
                       context: int = 2048, vocab_size: int = 800) -> Path:
    """Build a randomly initialised Gemma-architecture student + tokenizer and save_pretrained them."""
    from transformers import GemmaConfig, GemmaForCausalLM
    if size not in TINY_SIZES:
        raise ModelError(f"unknown tiny size {size!r}; choose one of {list(TINY_SIZES)}")
    out = Path(out_dir)
    tok = build_tokenizer(corpus, vocab_size)
    hidden, layers, heads, kv, head_dim, inter = TINY_SIZES[size]
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=head_dim, max_position_embeddings=context, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GemmaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "exgrpo_student.json").write_text(json.dumps({"size": size, "seed": seed, "vocab": len(tok)}))
    return out


def init_student(model_dir: str | Path, *, lora: bool = False, lora_r: int = 16, lora_alpha: int = 32,
                 dtype: str = "auto", device: str = "auto", gradient_checkpointing: bool = False, seed: int = 0,
                 attention: str = "auto"):
    """Load the student for training: (model, tokenizer, device). bf16 on CUDA and fp32 on CPU by default.
    LoRA adapters are initialised from `seed`: a run is reproducible, and every rank of a sharded run
    starts from the same adapter."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
          "fp32": torch.float32}[dtype]
    tok = load_tokenizer(check_model_dir(model_dir))
    model = load_model(model_dir, dtype=dt, device=dev, attention=attention)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ModelError(f"{model_dir}: {type(model).__name__} is not laid out as the trainer needs (a decoder "
                         "at model.model with its layers at model.model.layers, as Gemma, Llama and Qwen are)")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        torch.manual_seed(seed)
        model = add_lora(model, r=lora_r, alpha=lora_alpha)
    model.train()
    return model, tok, dev


def corpus_for(items) -> list[str]:
    """The texts a tiny student's tokenizer is trained on: every question (as prompted), R_T (the probe set's),
    probe (as prompted) and teacher response of a probe set."""
    from exgrpo.tasks import get_task
    out = []
    for it in items:
        out += [get_task(it.example.task).prompt(it.example), it.rationale or ""]
        for p in it.probes:
            out += [p.question, p.response]
    return [t for t in out if t]
