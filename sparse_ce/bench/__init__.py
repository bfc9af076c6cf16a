"""``sparse-ce bench``: time and memory of every attention path (:mod:`.command`, :mod:`.measure`, :mod:`.report`,
:mod:`.rank`)."""
