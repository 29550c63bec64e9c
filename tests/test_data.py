"""Data files: formats, masks, errors that name the file and line, bucketing, and fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekd.device.errors import UsageError
from edgekd.device.paths import resource
from edgekd.distill.data import collate, encode_chat, encode_records, padding_waste, plan_epoch, read_prompts, read_records


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("  \n\n", "is empty"),
    ('{"text": "ok"}\nnot json\n', r"bad.jsonl:2: not a JSON line"),
    ('[1, 2]\n', r"bad.jsonl:1: expected a JSON object"),
    ('{"content": "x"}\n', r"bad.jsonl:1: a record needs 'text', 'messages' or 'prompt'"),
    ('{"prompt": ""}\n', r"bad.jsonl:1: 'prompt' must be a non-empty string"),
    ('{"prompt": "a", "response": 3}\n', r"bad.jsonl:1: 'response' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad.jsonl:1: 'messages' has no assistant turn"),
    ('{"messages": [{"role": "user"}]}\n', r"bad.jsonl:1: each message needs"),
])
def test_bad_files_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        read_records(_write(tmp_path, "bad.jsonl", text))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="unsupported data file type '.csv'"):
        read_records(_write(tmp_path, "a.csv", "a,b\n"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="not UTF-8"):
        read_records(tmp_path / "bin.jsonl")


def test_prompt_response_masks_only_the_response(tokenizer):
    ex = encode_chat(tokenizer, [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the sea"}])
    targets = [t for t, m in zip(ex.ids, ex.target) if m]
    assert tokenizer.decode(targets) == "the sea<|im_end|>\n"
    prompt = tokenizer.decode([t for t, m in zip(ex.ids, ex.target) if not m])
    assert prompt.endswith("<|im_start|>assistant\n") and "hello world" in prompt
    cut = encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the sea"}], finished=False)
    assert tokenizer.decode([t for t, m in zip(cut.ids, cut.target) if m]) == "the sea"  # cut answers do not learn to stop


def test_multi_turn_messages_train_on_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "sea?"}, {"role": "assistant", "content": "blue"}]
    ex = encode_chat(tokenizer, msgs)
    assert tokenizer.decode([t for t, m in zip(ex.ids, ex.target) if m]) == "hello<|im_end|>\nblue<|im_end|>\n"
    assert tokenizer.decode(ex.ids) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_text_files_are_windowed_and_long_chat_truncated(tokenizer, tmp_path):
    recs = read_records(_write(tmp_path, "a.txt", "The capital of France is Paris. " * 20))
    examples, summary = encode_records(tokenizer, recs, max_length=16, train_on_prompt=False)
    assert all(len(e.ids) <= 16 and all(e.target) for e in examples) and len(examples) > 2
    short = encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    n_prompt = len(short.ids) - sum(short.target)
    long = [{"prompt": "x " * 100, "response": "y"}, {"prompt": "hi", "response": "the sea " * 50}]
    examples, summary = encode_records(tokenizer, long, max_length=n_prompt + 5, train_on_prompt=False)
    assert summary["truncated"] == 2 and summary["dropped_no_targets"] == 1 and len(examples) == 1


def test_prompts_from_txt_and_jsonl(tmp_path):
    assert read_prompts(_write(tmp_path, "p.txt", "one\n\ntwo\n")) == ["one", "two"]
    assert read_prompts(_write(tmp_path, "p.jsonl", '{"prompt": "a"}\n')) == ["a"]
    with pytest.raises(UsageError, match="record 1 has no 'prompt'"):
        read_prompts(_write(tmp_path, "q.jsonl", '{"text": "a"}\n'))


def test_shipped_prompt_set_is_large_varied_and_disjoint():
    train = read_prompts(resource("examples/prompts/train.jsonl"))
    held = read_prompts(resource("examples/prompts/heldout.jsonl"))
    assert len(train) + len(held) >= 300 and len(held) >= 30
    assert len(set(train)) == len(train) and not set(train) & set(held)
    starts = {p.split()[0] for p in train}
    assert len(starts) >= 15  # questions, how-tos, writing, code, math, definitions, advice...


def test_bucketed_batches_cover_every_example_once_and_pad_little():
    lengths = [5 + (i * 37) % 200 for i in range(300)]
    batches = plan_epoch(lengths, 4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert plan_epoch(lengths, 4, seed=0, epoch=0) == batches  # deterministic: resume sees the same order
    assert plan_epoch(lengths, 4, seed=0, epoch=1) != batches
    random_batches = [list(range(i, min(i + 4, 300))) for i in range(0, 300, 4)]
    assert padding_waste(batches, lengths) < 0.1 < padding_waste(random_batches, lengths)


def test_balanced_repeats_draw_each_label_as_often_as_the_commonest():
    from edgekd.distill.data import balanced_repeats

    labels = ["p"] * 7 + ["n"] * 3 + [None]
    r = balanced_repeats(labels, seed=0)
    assert sum(r[i] for i in range(7)) == 7 and sum(r[7:10]) == 7 and r[10] == 1
    assert all(x in (2, 3) for x in r[7:10]) and r == balanced_repeats(labels, seed=0)
    batches = plan_epoch([5] * 11, 4, seed=0, epoch=0, repeats=r)
    drawn = sorted(i for b in batches for i in b)
    assert drawn == sorted(i for i, k in enumerate(r) for _ in range(k))


def test_collate_shifts_the_loss_mask(tokenizer):
    ex = encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "sea"}])
    b = collate([ex], pad_id=0)
    n = len(ex.ids)
    assert b["loss_mask"][0, : n - 1].tolist() == [bool(t) for t in ex.target[1:]]
    assert b["labels"][0, : n - 1].tolist() == ex.ids[1:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.text(max_size=30),
    st.dictionaries(st.sampled_from(["text", "prompt", "response", "messages", "x"]),
                    st.one_of(st.text(max_size=8), st.integers(), st.none(),
                              st.lists(st.dictionaries(st.sampled_from(["role", "content"]), st.text(max_size=5)), max_size=3)),
                    max_size=3).map(json.dumps),
), max_size=5))
def test_fuzz_any_jsonl_loads_or_raises_usage_error(tmp_path, tokenizer, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        records = read_records(path)
        encode_records(tokenizer, records, max_length=32, train_on_prompt=False)
    except UsageError:
        pass
