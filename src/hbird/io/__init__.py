"""hbird's one room for reading and writing.

* :mod:`hbird.io.files` — atomic writes of files and folders (temporary sibling, fsync,
  rename), one file mode for everything hbird writes, and the rule for replacing a folder
  (only one hbird wrote, never a user's files).
* :mod:`hbird.io.images` — images, class masks and depth maps, read and written.
* :mod:`hbird.io.options` — ``key=value`` text: values, pairs and ``name:k=v:k=v`` specs.
* :mod:`hbird.io.seeds` — one way to derive a seed or a generator from a base seed.

Nothing is imported here, so ``import hbird.io.options`` does not pay for torch or PIL.
"""
