"""Write the project's own small agent SFT sample (SWE-agent XML tool calls): deterministic, no downloads.

Run ``python agent_obs/data/make_sample.py`` to regenerate ``agent_sft_train.jsonl`` and
``agent_sft_val.jsonl`` beside it. Conversations are synthetic: a made-up repository, a bug
report (some in other languages, with emoji), and an agent that explores, edits, tests and submits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = """You are a helpful assistant that can interact with a computer to solve tasks.

You have access to the following functions:

---- BEGIN FUNCTION #1: bash ----
Description: Execute a bash command in the terminal.
Parameters:
  (1) command (string, required): The bash command to execute.
---- END FUNCTION #1 ----

---- BEGIN FUNCTION #2: str_replace_editor ----
Description: View, create and edit files.
Parameters:
  (1) command (string, required): One of `view`, `create`, `str_replace`, `insert`.
  (2) path (string, required): Absolute path to the file.
  (3) old_str (string, optional), (4) new_str (string, optional), (5) file_text (string, optional)
---- END FUNCTION #2 ----

---- BEGIN FUNCTION #3: find_file ----
Description: Find files whose name matches a pattern.
Parameters:
  (1) file_name (string, required), (2) dir (string, optional)
---- END FUNCTION #3 ----

---- BEGIN FUNCTION #4: submit ----
Description: Finish the interaction when the task is complete.
No parameters are required for this function.
---- END FUNCTION #4 ----

If you choose to call a function ONLY reply in the following format with NO suffix:

<function=example_function_name>
<parameter=example_parameter_1>value_1</parameter>
</function>

Reminder: function calls MUST follow the specified format, start with <function= and end with </function>.
Always include exactly one function call per response."""

# (package, module, function, buggy line, fixed line, issue text, failing output)
BUGS = [
    (
        "tempo",
        "units.py",
        "to_celsius",
        "return (f - 32) * 5 / 8",
        "return (f - 32) * 5 / 9",
        "`to_celsius(212)` returns 112.5 instead of 100 °C.",
        "AssertionError: 112.5 != 100.0",
    ),
    (
        "wordy",
        "slug.py",
        "slugify",
        "return text.lower().replace(' ', '_')",
        "return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')",
        'slugify("Café au lait — déjà vu") should give `caf-au-lait-d-j-vu`, got spaces & accents → underscores.',
        "AssertionError: 'café_au_lait_—_déjà_vu' != 'caf-au-lait-d-j-vu'",
    ),
    (
        "ledger",
        "money.py",
        "split_bill",
        "share = total // people",
        "share = round(total / people, 2)",
        "割り勘 (split_bill) で 100 を 3 人で割ると 33 になります。33.33 が期待値です 💴",
        "AssertionError: 33 != 33.33",
    ),
    (
        "geo",
        "distance.py",
        "haversine",
        "a = sin(dlat / 2) ** 2 + cos(lat1) * cos(lat2) * sin(dlon) ** 2",
        "a = sin(dlat / 2) ** 2 + cos(lat1) * cos(lat2) * sin(dlon / 2) ** 2",
        "Distance Paris → Berlin is 1 724 km, should be ≈ 878 km 🗺️",
        "AssertionError: 1724.3 not within 5 of 878",
    ),
    (
        "textkit",
        "wrap.py",
        "count_words",
        "return len(text.split(' '))",
        "return len(text.split())",
        "count_words('hello  world\\n') returns 3; double spaces and newlines count as words.",
        "AssertionError: 3 != 2",
    ),
    (
        "calendar2",
        "dates.py",
        "is_leap",
        "return year % 4 == 0",
        "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
        "Das Jahr 1900 wird als Schaltjahr erkannt (is_leap(1900) == True). Das ist falsch ❌",
        "AssertionError: True is not false",
    ),
    (
        "matrixlite",
        "ops.py",
        "transpose",
        "return [[m[i][j] for i in range(len(m[0]))] for j in range(len(m))]",
        "return [[m[i][j] for i in range(len(m))] for j in range(len(m[0]))]",
        "transpose() of a 2x3 matrix raises IndexError: list index out of range",
        "IndexError: list index out of range",
    ),
    (
        "shopcart",
        "cart.py",
        "total",
        "return sum(item.price for item in self.items)",
        "return sum(item.price * item.qty for item in self.items)",
        "Le total du panier ignore la quantité : 3 x 2,50 € donne 2,50 € 🛒",
        "AssertionError: 2.5 != 7.5",
    ),
]

THOUGHTS_EXPLORE = [
    "Let me start by looking at the repository layout to find the relevant module.",
    "I'll explore the repository structure first.",
    "First, let me see which files exist in the project.",
    "",
]
THOUGHTS_VIEW = [
    "Let me open `{module}` to see how `{func}` is implemented.",
    "Now I'll look at the implementation of `{func}`.",
    "The function is probably in `{module}`; let me view it.",
]
THOUGHTS_REPRO = [
    "Let me write a small script that reproduces the problem.",
    "Before fixing anything, I want to reproduce the bug.",
]
THOUGHTS_FIX = [
    "I see the bug: the line `{bad}` is wrong. Let me fix it.",
    "The problem is here — `{bad}`. I'll replace it with the correct expression.",
    "Found it. `{bad}` does not do what the issue expects; fixing it now.",
]
THOUGHTS_TEST = [
    "Now let me rerun the reproduction script to confirm the fix.",
    "Let me run the tests again.",
]
THOUGHTS_SUBMIT = [
    "The fix works and the tests pass. Submitting.",
    "Everything passes now ✓ — I'll submit the change.",
    "",
]


def call(name: str, **params: str) -> str:
    """One SWE-agent XML tool call."""
    body = "".join(f"<parameter={k}>{v}</parameter>\n" for k, v in params.items())
    return f"<function={name}>\n{body}</function>"


def turn(thought: str, tool_call: str) -> dict:
    return {"role": "assistant", "content": f"{thought}\n\n{tool_call}" if thought else f"\n\n{tool_call}"}


def observation(text: str) -> dict:
    return {"role": "user", "content": f"OBSERVATION:\n{text}"}


def conversation(rng: random.Random, bug: tuple) -> dict:
    pkg, module, func, bad, good, issue, failure = bug
    path = f"/testbed/{pkg}/{module}"
    source = f'import re\nfrom math import cos, sin\n\n\ndef {func}(*args):\n    """See the docs."""\n    {bad}\n'
    fmt = {"module": module, "func": func, "bad": bad}
    msgs = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"<uploaded_files>\n/testbed\n</uploaded_files>\n"
            f"Consider the following issue in the `{pkg}` repository:\n\n"
            f"<pr_description>\n{issue}\n</pr_description>\n\n"
            "Make the minimal changes to non-test files so that the issue is resolved.",
        },
    ]
    if rng.random() < 0.5:
        msgs.append(
            turn(rng.choice(THOUGHTS_EXPLORE), call("bash", command=f"ls -R /testbed | head -n {rng.randint(20, 60)}"))
        )
        msgs.append(
            observation(f"/testbed:\nREADME.md\n{pkg}\nsetup.py\ntests\n\n/testbed/{pkg}:\n__init__.py\n{module}")
        )
    else:
        msgs.append(turn(rng.choice(THOUGHTS_EXPLORE), call("find_file", file_name=module, dir="/testbed")))
        msgs.append(observation(f'Found 1 matches for "{module}" in /testbed:\n{path}'))
    msgs.append(turn(rng.choice(THOUGHTS_VIEW).format(**fmt), call("str_replace_editor", command="view", path=path)))
    numbered = "\n".join(f"{i:6}\t{line}" for i, line in enumerate(source.splitlines(), 1))
    msgs.append(observation(f"Here's the result of running `cat -n` on {path}:\n{numbered}"))
    if rng.random() < 0.7:
        script = f"from {pkg}.{module[:-3]} import {func}\nprint({func}())  # the issue's example\n"
        msgs.append(
            turn(
                rng.choice(THOUGHTS_REPRO),
                call("str_replace_editor", command="create", path="/testbed/reproduce.py", file_text=f"\n{script}\n"),
            )
        )
        msgs.append(observation("File created successfully at: /testbed/reproduce.py"))
        msgs.append(turn("", call("bash", command="cd /testbed && python reproduce.py")))
        msgs.append(
            observation(f'Traceback (most recent call last):\n  File "/testbed/reproduce.py", line 2\n{failure}')
        )
    msgs.append(
        turn(
            rng.choice(THOUGHTS_FIX).format(**fmt),
            call(
                "str_replace_editor",
                command="str_replace",
                path=path,
                old_str=f"\n    {bad}\n",
                new_str=f"\n    {good}\n",
            ),
        )
    )
    msgs.append(
        observation(f"The file {path} has been edited. Here's a snippet:\n     7\t    {good}\nReview the changes.")
    )
    passed = rng.randint(3, 40)
    msgs.append(
        turn(rng.choice(THOUGHTS_TEST), call("bash", command=f"cd /testbed && python -m pytest -q tests/test_{module}"))
    )
    msgs.append(observation(f"{'.' * passed}\n{passed} passed in 0.{rng.randint(10, 99)}s"))
    msgs.append(turn(rng.choice(THOUGHTS_SUBMIT), call("submit")))
    return {"messages": msgs, "instance_id": f"{pkg}__{func}-{rng.randint(100, 999)}"}


def main(n_train: int = 32, n_val: int = 8) -> None:
    out_dir = Path(__file__).resolve().parent
    rng = random.Random(20250101)
    rows = [conversation(rng, BUGS[i % len(BUGS)]) for i in range(n_train + n_val)]
    for name, part in (("agent_sft_train.jsonl", rows[:n_train]), ("agent_sft_val.jsonl", rows[n_train:])):
        with (out_dir / name).open("w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
