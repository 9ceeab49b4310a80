"""The edit, the same for every checkpoint format.

- :mod:`.lock`: the lock (heads, unit directions, scales) and its file format; :mod:`.legacy`: safe import of
  ``.safelock`` pickles;
- :mod:`.families`: the Hugging Face families as data (which class, which names, what is refused and why);
- :mod:`.edit`: displacements, ``W_o @ d`` over the touched heads' columns in row blocks, the checks on the result;
- :mod:`.records`: what an edit records and the bounds on reading it back;
- :mod:`.report`: the verify report (checks and their statuses) and the failures built from it;
- :mod:`.bounds`: the one table of numeric bounds every option and record field is checked against;
- :mod:`.describe`: a lock summarised for ``inspect``.

Nothing here imports a format, an engine or the lab.
"""
