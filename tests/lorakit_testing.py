"""Test helpers shared by every test folder: seeded tiny models and tokenizers built in-process (no hub)."""

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, **overrides):
    """A 2-layer random Llama; the same seed always gives the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


class TinyMLP(torch.nn.Module):
    """A plain PyTorch model (not transformers) for the "any nn.Module" tests."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.act = torch.nn.GELU()
        self.down = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_byte_tokenizer(chat_template=CHATML_TEMPLATE, merges=()):
    """Byte-level BPE (one token per byte, plus a token per ``merges`` pair) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", additional_special_tokens=["<|im_start|>"]
    )
    hf.chat_template = chat_template
    return hf


def save_tiny_model_dir(directory, seed: int = 0):
    """A tiny Llama + byte-level ChatML tokenizer saved with ``save_pretrained`` (loads with ``lorakit.load_model``)."""
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(seed, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, initializer_range=0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
