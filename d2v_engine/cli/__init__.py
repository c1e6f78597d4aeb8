"""The command lines, one module each, and nothing else: argument parsing, the one-line errors,
exit codes. d2v-train (train.py), d2v-prepare (prepare.py), d2v-export (export.py), d2v-probe
(probe.py), d2v-checkpoint (checkpoint.py); tokenize.py is `d2v-prepare text` under another name.

May import: anything in d2v_engine; nothing imports it.
"""
