"""Build the tiny chat mixture shipped in ``pipeline/assets/tiny/chat`` (used by ``configs/tiny_chat.yaml``).

The synthetic arithmetic task of ``tiny/data/train.jsonl`` re-expressed in the three chat formats, so the
tiny teacher (trained on that task with the ChatML template) is a meaningful teacher for them and answers
still end in ``#### N``:

* ``openai.jsonl``   — 100 conversations of ``messages``; every 4th holds two exchanges (multi-turn);
* ``sharegpt.jsonl`` — 100 conversations of ``conversations`` (from/value), the same multi-turn pattern;
* ``alpaca.jsonl``   — 100 instruction/input/output rows; every 3rd puts the problem in ``input``;
* ``mixture.txt``    — ``name path proportion format`` lines: openai 0.5, sharegpt 0.3, alpaca 0.2.

Deterministic: rows are taken in file order. Run ``python -m pipeline.assets.tiny_chat`` to rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY = Path(__file__).resolve().parent / "tiny"
CHAT_DIR = TINY / "chat"
CONVERSATIONS = 100
MIXTURE = "# name     path            proportion  format\nopenai     openai.jsonl    0.5         openai\n" \
          "sharegpt   sharegpt.jsonl  0.3         sharegpt\nalpaca     alpaca.jsonl    0.2         alpaca\n"


def _conversations(rows: list[dict], first: int) -> tuple[list[list[tuple[str, str]]], int]:
    """CONVERSATIONS lists of (question, answer) exchanges starting at row ``first``; the next free row."""
    chats, row = [], first
    for k in range(CONVERSATIONS):
        size = 2 if k % 4 == 3 else 1
        chats.append([(rows[i]["question"], rows[i]["answer"]) for i in range(row, row + size)])
        row += size
    return chats, row


def build_files(rows: list[dict]) -> dict[str, str]:
    """{file name: content} of the chat mixture, from the tiny task's training rows."""
    openai_chats, row = _conversations(rows, 0)
    sharegpt_chats, row = _conversations(rows, row)
    openai = [{"messages": [m for q, a in chat for m in ({"role": "user", "content": q},
                                                          {"role": "assistant", "content": a})]}
              for chat in openai_chats]
    sharegpt = [{"conversations": [m for q, a in chat for m in ({"from": "human", "value": q},
                                                                 {"from": "gpt", "value": a})]}
                for chat in sharegpt_chats]
    alpaca = []
    for k, source in enumerate(rows[row:row + CONVERSATIONS]):
        if k % 3 == 2:
            alpaca.append({"instruction": "Solve the word problem.", "input": source["question"],
                           "output": source["answer"]})
        else:
            alpaca.append({"instruction": source["question"], "input": "", "output": source["answer"]})

    def lines(items: list[dict]) -> str:
        return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)

    return {"openai.jsonl": lines(openai), "sharegpt.jsonl": lines(sharegpt), "alpaca.jsonl": lines(alpaca),
            "mixture.txt": MIXTURE}


def read_task_rows() -> list[dict]:
    with (TINY / "data" / "train.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


if __name__ == "__main__":
    CHAT_DIR.mkdir(exist_ok=True)
    for name, text in build_files(read_task_rows()).items():
        (CHAT_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {CHAT_DIR / name}")
