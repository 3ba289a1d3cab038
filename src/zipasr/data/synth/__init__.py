"""The synthetic default corpus: a hand-written English grammar (``sentences``) spoken offline by
espeak-ng (``corpus``), and its subcommand ``synth`` (``cli``). Import from those modules."""
