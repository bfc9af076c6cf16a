"""``sparse-ce serve``: re-ranking over HTTP (TEI ``/rerank``, Cohere-style ``/v1/rerank``) with batching across
requests (:mod:`.batcher`), checked request bodies (:mod:`.schemas`, :mod:`.encoding`), Prometheus metrics
(:mod:`.metrics`), the Starlette app (:mod:`.app`), the command (:mod:`.command`) and the load benchmark
``sparse-ce serve-bench`` (:mod:`.bench`). Nothing here imports the web stack until a server is built."""
