import pytest
import torch
import transformers

from slimtune.eval.exact_match import exact_match_eval
from slimtune.eval.generate import format_prompt, generate
from slimtune.eval.translate import fill_prompt, language_name, translation_eval
from slimtune.models.tiny import tiny_llama_config, train_tiny_tokenizer, udhr_texts

PROMPT, ANSWER = "Say hello in Sardinian.", "Salude a totus, bonas dies!"


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(udhr_texts("eng") + udhr_texts("src"))


@pytest.fixture(scope="module")
def trained(tok):
    """A tiny Llama that has memorised one chat exchange (ending in <|im_end|>)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}], tokenize=False
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    return model


def test_generation_runs_on_random_tiny_model(tok):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    model.train()
    side = tok.padding_side
    outs = generate(model, tok, ["Hello", "Article 1 of the declaration says"], max_new_tokens=6, batch_size=2)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert not any(s in o for o in outs for s in ("<|im_end|>", "<|pad|>", "<|im_start|>"))
    assert model.training and tok.padding_side == side
    assert outs == generate(model, tok, ["Hello", "Article 1 of the declaration says"], max_new_tokens=6)
    raw = generate(model, tok, ["Hello"], max_new_tokens=4, chat_template=False)
    assert len(raw) == 1


def test_format_prompt_uses_chat_template(tok):
    text = format_prompt(tok, "hi", system="be brief")
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tok, "hi", chat_template=False) == "hi"


def test_greedy_left_padded_batch_reproduces_memorised_answer(trained, tok):
    long_prompt = " ".join(udhr_texts("eng")[2].split()[:40])  # forces left padding of PROMPT in the batch
    outs = generate(trained, tok, [PROMPT, long_prompt], max_new_tokens=30, batch_size=2)
    assert outs[0] == ANSWER
    assert generate(trained, tok, [PROMPT], max_new_tokens=30) == [ANSWER]


def test_sampling_is_seeded_and_leaves_global_rng_alone(trained, tok):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(trained, tok, ["Article"], max_new_tokens=5, do_sample=True, temperature=2.0, seed=7)
    b = generate(trained, tok, ["Article"], max_new_tokens=5, do_sample=True, temperature=2.0, seed=7)
    assert a == b
    assert torch.equal(torch.get_rng_state(), state)


def test_exact_match(trained, tok):
    r = exact_match_eval(trained, tok, [(PROMPT, ANSWER + "  "), (PROMPT, "nope")], max_new_tokens=30)
    assert r["correct"] == 1 and r["n"] == 2 and r["exact_match"] == pytest.approx(50.0)
    assert r["examples"][0] == {"prompt": PROMPT, "answer": ANSWER + "  ", "output": ANSWER}


def test_translation_eval_scores_and_examples(trained, tok):
    r = translation_eval(
        trained, tok, [(PROMPT, ANSWER)], src_lang="English", tgt_lang="Sardinian", prompt="{text}",
        max_new_tokens=30, examples=1,
    )
    assert r["bleu"] == pytest.approx(100.0) and r["chrf"] == pytest.approx(100.0) and r["n"] == 1
    assert r["examples"] == [{"src": PROMPT, "ref": ANSWER, "hyp": ANSWER}]


def test_prompt_helpers():
    assert language_name("eng_Latn") == "English" and language_name("srd_Latn") == "Sardinian"
    assert language_name("src") == "Sardinian" and language_name("Klingon") == "Klingon"
    s = fill_prompt("{src_lang}->{tgt_lang}: {text}", src_lang="English", tgt_lang="Sardinian", text="a {x} b")
    assert s == "English->Sardinian: a {x} b"
