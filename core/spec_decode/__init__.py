"""Speculative decoding: proposers (n-gram prompt lookup, a draft model, Medusa heads), the engine hook that
attaches drafts before scheduling (`decoder.py`), and exact verification in the runner
(`verify.py`, `rejection.py`)."""
from textgen.core.spec_decode.decoder import LoadedSpeculator, SpecDecoder, load_speculator
from textgen.core.spec_decode.ngram import propose_ngram
from textgen.core.spec_decode.proposer import Draft, DraftQuery, NgramProposer, Proposer
from textgen.core.spec_decode.rejection import Verified, verify_drafts

__all__ = ["Draft", "DraftQuery", "LoadedSpeculator", "NgramProposer", "Proposer", "SpecDecoder", "Verified",
           "load_speculator", "propose_ngram", "verify_drafts"]
