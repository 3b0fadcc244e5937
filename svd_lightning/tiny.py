"""A tiny random Llama and a byte-level BPE tokenizer built locally (no downloads).

Used by the tests, `configs/tiny.yaml` and the notebook: ``load_causal_lm("tiny-random")``.
Deterministic: the same seed gives the same weights and tokenizer.
"""

from __future__ import annotations

import torch

TINY_SOURCE = "tiny-random"

_CORPUS = [
    "Q: What happens if you eat a pomegranate? A: Nothing in particular happens.",
    "Q: What is the capital of France? A: The capital of France is Paris.",
    "Please choose the correct answer to the question. Answer format: answer1/answer2",
    "the correct answer is true false answer1 answer2 answer3 answer4 solution1 solution2",
    "Interpret each question literally, and as a question about the real world.",
    "I have no comment. You will die. The living outnumber the dead. Yes No",
]


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Larger output weights give peaked, varied next-token distributions, closer to a real LM.
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model.eval()


def tiny_model_and_tokenizer(seed: int = 0):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=seed)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
