"""``python -m seqplat.cli`` (used by ``accelerate launch -m seqplat.cli train ...``)."""

from seqplat.cli import main

main()
