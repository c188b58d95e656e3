"""`larimar chat` command handling and the CLI dispatcher, on a tiny model."""

from larimar.chat import handle
from larimar.cli import build_parser
from larimar.testing import tiny_larimar


def test_chat_add_ask_forget_save_load(tmp_path):
    model = tiny_larimar()
    out: list[str] = []
    assert handle(model, "+ The capital of France is Rome.", 3, out.append)
    assert len(model) == 1 and "written" in out[-1]
    handle(model, "? The capital of France is", 3, out.append)
    assert "[memory" in out[-1] or "[plain" in out[-1]
    handle(model, ":list", 3, out.append)
    assert "Rome" in out[-1]
    handle(model, f":save {tmp_path / 'mem'}", 3, out.append)
    handle(model, "- never written fact", 3, out.append)
    assert out[-1].startswith("  error:") and len(model) == 1  # failed forget leaves memory unchanged
    handle(model, "- The capital of France is Rome.", 3, out.append)
    assert len(model) == 0
    handle(model, f":load {tmp_path / 'mem'}", 3, out.append)
    assert len(model) == 1
    handle(model, "+    ", 3, out.append)
    assert out[-1].startswith("  error:")
    handle(model, ":bogus", 3, out.append)
    assert "unknown command" in out[-1]
    assert handle(model, ":quit", 3, out.append) is False


def test_cli_lists_commands_and_imports_only_the_chosen_one():
    parser = build_parser("")
    names = set(parser._subparsers._group_actions[0].choices)
    assert {"demo", "chat", "bench", "train", "scope", "eval"} <= names
    args = build_parser("bench").parse_args(["bench", "memory", "--json"])
    assert args.target == "memory" and args.json


def test_chat_and_demo_end_answers_at_the_first_sentence_end_unless_whole(monkeypatch):
    model = tiny_larimar()
    seen: list[bool] = []
    real = model.generate

    def spy(*a, **kw):
        seen.append(kw["stop_after_answer"])
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", spy)
    handle(model, "? The capital of France is", 3, [].append)
    handle(model, "? The capital of France is", 3, [].append, stop_after_answer=False)
    assert seen == [True, False]
    assert build_parser("demo").parse_args(["demo"]).whole is False
    assert build_parser("chat").parse_args(["chat", "--whole"]).whole is True


def test_chat_writes_and_forgets_a_fact_keyed_by_its_prompt(monkeypatch):
    from larimar.chat import parse_fact

    assert parse_fact(" The capital of France is | Rome ") == ("The capital of France is Rome", "The capital of France is")
    assert parse_fact(" plain text ") == ("plain text", None)
    model = tiny_larimar(keyed_writes=True, value_writes=True)
    calls = []
    real = model.write

    def spy(texts, *a, **kw):
        calls.append((list(texts), kw.get("keys"), kw.get("values")))
        return real(texts, *a, **kw)

    monkeypatch.setattr(model, "write", spy)
    out: list[str] = []
    handle(model, "+ The capital of France is | Rome", 3, out.append)
    assert calls == [(["The capital of France is Rome"], ["The capital of France is"], ["Rome"])]
    assert "written" in out[-1]  # no tip after a keyed write
    handle(model, "+ Paris is in Texas.", 3, out.append)
    assert "PROMPT | ANSWER" in out[-1] and calls[-1] == (["Paris is in Texas."], None, None)
    handle(model, "- Paris is in Texas.", 3, out.append)
    handle(model, "+ The capital of France is |  ", 3, out.append)
    assert out[-1].startswith("  error:") and len(model) == 1
    handle(model, "- The capital of France is | Rome", 3, out.append)
    assert len(model) == 0
