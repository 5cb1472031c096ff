"""textgen.testing: what a backend vendor (and textgen's own tests) use to check a backend.

- `steps`: build a step's inputs and a kernel's metadata exactly as the engine does, from plain
  request descriptions (cached prefix length, new tokens, block ids).
- `conformance`: the conformance kit (`textgen check-backend NAME`).
"""
