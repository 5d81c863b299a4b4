"""`llmkit chat`: a multi-turn conversation through the model's own chat template, streamed token by token.

The whole history is re-rendered with the template every turn (templates differ in how they join turns, so
only the template knows the exact text). When it no longer fits the context, the oldest turns are dropped and
the user is told. Generation stops at the template's end-of-turn token (`<|im_end|>` for ChatML).

On a terminal it is a REPL; with stdin from a pipe or file it reads one user turn per line until `/exit` or EOF,
so a conversation can be scripted and tested.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from llmkit.data.tokenizer import end_of_turn_ids
from llmkit.errors import ConfigError, LLMKitError
from llmkit.infer.api import LLM
from llmkit.infer.generate import Generation, SamplingConfig

COMMANDS = "/reset clears the history, /exit quits"


@dataclass
class ChatSession:
    """The conversation so far and how to extend it within the model's context window."""

    llm: LLM
    sampling: SamplingConfig
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)  # user/assistant turns, oldest first

    def messages(self, user: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user}]

    def fit(self, user: str) -> tuple[list[int], int]:
        """Prompt ids for the next turn and how many old turns had to go to leave room for the reply."""
        ctx = self.llm.model.cfg.block_size
        room = min(self.sampling.max_new_tokens, ctx // 2)  # keep space to answer in
        dropped = 0
        while True:
            text = self.llm.tokenizer.apply_chat_template(self.messages(user), add_generation_prompt=True)
            ids = self.llm.tokenizer.encode_prompt(text)  # BOS unless the template wrote it already
            if len(ids) + room <= ctx or not self.history:
                break
            self.history = self.history[2:]  # the oldest user turn and its answer
            dropped += 1
        if len(ids) >= ctx:
            raise ConfigError(f"this message is {len(ids)} tokens with the template; the context holds {ctx}")
        return ids, dropped

    def reply(self, user: str, on_text: Callable[[int, str], None] | None = None,
              on_dropped: Callable[[int], None] | None = None) -> Generation:
        """Answer one user turn and record both in the history. `on_dropped(n)` hears when n old turns had to
        go, before the answer starts streaming."""
        ids, dropped = self.fit(user)
        if dropped and on_dropped is not None:
            on_dropped(dropped)
        eos = set(end_of_turn_ids(self.llm.tokenizer))
        out = self.llm.generate([ids], on_text=on_text, eos_ids=eos, config=self.sampling)[0]
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": out.text.strip()}]
        return out

    def reset(self) -> None:
        self.history = []


def run_chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None, name: str = "model") -> int:
    """The REPL. Replies go to stdout (streamed); notices (banner, dropped turns, resets) to stderr.
    Returns the number of replies given."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {name} ({COMMANDS})", file=stderr)
    replies = 0
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                line = stdin.readline()
                if not line:  # EOF
                    break
        except EOFError:
            break
        user = line.rstrip("\r\n")
        if not user.strip():
            continue
        if user.strip().startswith("/"):
            cmd = user.strip().split()[0]
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                print("(history cleared)", file=stderr)
            else:
                print(f"(unknown command {cmd}; {COMMANDS})", file=stderr)
            continue

        def on_text(_: int, text: str) -> None:
            stdout.write(text)
            stdout.flush()

        def on_dropped(n: int) -> None:
            print(f"(context full: dropped the {n} oldest turn{'s' if n > 1 else ''} of the history)", file=stderr)

        if interactive:
            stdout.write("assistant> ")
        try:
            out = session.reply(user, on_text=on_text, on_dropped=on_dropped)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n(interrupted)", file=stderr)
            continue
        except LLMKitError as e:  # e.g. one message longer than the context: say so, keep going
            print(f"(error: {e})", file=stderr)
            continue
        stdout.write("\n")
        stdout.flush()
        replies += 1
        if out.context_full:
            print("(reply cut: the model's context window is full; /reset to start over)", file=stderr)
        elif out.finish_reason == "length":
            print(f"(reply cut at --max-new-tokens {session.sampling.max_new_tokens})", file=stderr)
    return replies
