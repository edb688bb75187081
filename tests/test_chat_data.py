"""Chat / instruction data: both schemas, templates, response-only loss masks, packing."""

import json

import numpy as np
import pytest

from sparse_llama.data import chat
from sparse_llama.data.tokenizer import default_tokenizer

CHATML = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
          "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(512)


def trained_text(tok, ids, trained):
    """The text of the trained tokens, as targets of the (input, target) pairs."""
    x, t = np.asarray(ids), np.asarray(trained)
    return tok.decode(x[1:][t[1:]])


def test_prompt_response_trains_only_the_response(tok):
    render = chat.renderer_for(tok, None)
    messages = chat.conversation({"prompt": "What is a llama?", "response": "An animal."})
    ids, trained = chat.tokenize_conversation(messages, render, tok)
    assert ids[0] == tok.bos_id and not trained[0]
    assert trained_text(tok, ids, trained) == "An animal.</s>"
    assert tok.decode(ids[1:]) == ("### User:\nWhat is a llama?\n\n### Assistant:\n"
                                   "An animal.</s>")


def test_messages_train_every_assistant_turn_and_nothing_else(tok):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Sum 2 and 2"},
        {"role": "assistant", "content": "4"}]}
    render = chat.renderer_for(tok, None)
    ids, trained = chat.tokenize_conversation(chat.conversation(record), render, tok)
    assert trained_text(tok, ids, trained) == "Hello!</s>4</s>"


def test_the_tokenizers_chat_template_is_used(tok, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    render = chat.renderer_for(tok, tmp_path)
    record = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello there"}]}
    ids, trained = chat.tokenize_conversation(chat.conversation(record), render, tok)
    # trim_blocks, as transformers renders: no newline after a block tag.
    assert tok.decode(ids) == "<s><|user|>\nHi<|assistant|>\nHello there</s>"
    assert (ids == tok.bos_id).sum() == 1  # the template's BOS, not a second one
    assert trained_text(tok, ids, trained) == "Hello there</s>"
    plain = chat.renderer_for(tok, tmp_path, "plain")
    assert plain(chat.conversation(record), False).startswith("### User:")


def test_a_template_that_does_not_extend_its_prefix_is_refused(tok, tmp_path):
    bad = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": bad}))
    render = chat.renderer_for(tok, tmp_path)
    messages = chat.conversation({"prompt": "a", "response": "b"})
    with pytest.raises(ValueError, match="data.chat_template=plain"):
        chat.tokenize_conversation(messages, render, tok)


def test_rows_pack_conversations_with_segments_and_response_mask(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [{"prompt": f"question {i}", "response": f"answer number {i}"} for i in range(5)]
    records.append({"messages": [{"role": "user", "content": "x"},
                                 {"role": "assistant", "content": "y"}]})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert chat.is_chat_jsonl(path)
    convs = chat.read_chat_jsonl(path)
    assert len(convs) == 6 and convs.ids[0] == "chat.jsonl:1"
    render = chat.renderer_for(tok, None)
    parts = [chat.tokenize_conversation(m, render, tok) for m in convs.messages]
    rows = chat.chat_rows(parts, 64)
    inputs = np.concatenate([r["inputs"] for r in rows])
    targets = np.concatenate([r["targets"] for r in rows])
    mask = np.concatenate([r["loss_mask"] for r in rows])
    seg = np.concatenate([r["segment_ids"] for r in rows])
    want = "".join(f"answer number {i}</s>" for i in range(5)) + "y</s>"
    assert tok.decode(targets[mask > 0]) == want
    # Inputs are the conversations' tokens in order; padding only at the very end.
    flat = np.concatenate([ids[:-1] for ids, _ in parts])
    np.testing.assert_array_equal(inputs[seg > 0], flat)
    assert np.all(mask[seg == 0] == 0)
    first = rows[0]
    assert first["positions"][0] == 0 and first["segment_ids"][0] == 1
    boundary = len(parts[0][0]) - 1  # pairs of the first conversation
    assert first["segment_ids"][boundary] == 2 and first["positions"][boundary] == 0


def test_records_of_neither_schema_or_without_an_assistant_turn_are_refused(tmp_path):
    with pytest.raises(ValueError, match="needs 'messages'.*'prompt' and 'response'"):
        chat.conversation({"text": "hello"}, "f.jsonl:3")
    with pytest.raises(ValueError, match="f.jsonl:1: the conversation has no assistant turn"):
        chat.conversation({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl:1")
    with pytest.raises(ValueError, match="message 0 must be"):
        chat.conversation({"messages": [{"role": "bot", "content": "hi"}]})
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"
                    + json.dumps({"text": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: a chat record needs"):
        chat.read_chat_jsonl(path)
    text = tmp_path / "plain.jsonl"
    text.write_text(json.dumps({"text": "c"}) + "\n")
    assert not chat.is_chat_jsonl(text)


def test_the_pipeline_recognises_a_chat_jsonl_and_holds_out_conversations(tok, tmp_path):
    from configs import blocks
    from sparse_llama.data import pipeline

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"reply-{i}."})
                            + "\n" for i in range(60)))
    cfg = blocks.data(seq_len=32)
    cfg.update(path=str(path), validation_fraction=0.2, shuffle=False, prefetch_batches=0)

    def replies(batches):
        """The trained text of consecutive batches (windows in stream order), per reply."""
        targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
        return [r for r in tok.decode(targets).split("</s>") if r]

    it = pipeline.train_iterator(cfg, tok, seq_len=32, global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)
    train = replies([next(it) for _ in range(24)])  # more than one epoch
    held = replies(pipeline.eval_batches(cfg, tok, seq_len=32, batch_size=4))
    allowed = {f"reply-{i}." for i in range(60)}
    assert train and held and set(train) <= allowed and set(held) <= allowed
    assert not set(train) & set(held)  # by conversation: none on both sides
    assert len(set(train) | set(held)) == 60
