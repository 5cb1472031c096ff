"""GrammarState: one request's position in its compiled grammar."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llguidance

    from textgen.core.grammar.compiler import CompiledGrammar


@dataclass(slots=True)
class GrammarState:
    """Owned by the engine thread; created by `GrammarManager.new_state`, moved by `advance`.

    Lifecycle: running -> complete (the grammar is satisfied and cannot grow; its mask allows only
    EOS) -> terminated (EOS consumed). A rejected token moves it to terminated with `error` set;
    from then on its mask allows only EOS, so a batch never gets a row with nothing allowed.
    """

    matcher: llguidance.LLMatcher
    compiled: CompiledGrammar
    eos_consumed: bool = False

    @property
    def accepts_eos(self) -> bool:
        """The output so far is a full match: EOS may come now."""
        return self.matcher.is_accepting()

    @property
    def is_complete(self) -> bool:
        """Nothing but EOS may follow (the match cannot be extended)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def is_terminated(self) -> bool:
        """EOS was consumed, or a token was rejected: no further token is expected."""
        return self.eos_consumed or self.matcher.is_error()

    @property
    def error(self) -> str | None:
        """The first line of the matcher's error after a rejected token, else None."""
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error().strip().splitlines()[0]
