"""Language models for decoding: an LSTM token LM (shallow fusion) and a Kneser-Ney token bigram
(LODR's low-order LM), both over the BPE model's token ids; ``zipasr train-lm`` trains them.

Modules: ``model`` (RnnLm), ``bigram`` (estimation, ARPA files, BigramLm tables), ``data``
(sentences from manifests, batches), ``train`` (training loops, loading), ``cli``.
"""
