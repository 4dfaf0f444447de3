"""``python -m latexblend.toy ROOT --concept NAME``: draw a toy concept's instance images and prior set."""

from latexblend.toy.world import main

main()
