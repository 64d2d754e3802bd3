"""`sanakit serve`: a local web page that watches a run and samples its checkpoints.

``work_dir.py`` tells a run from anything else (cheaply, before the heavy imports);
``metrics.py`` and ``run_view.py`` read a work dir (never write it); ``checkpoints.py`` lists and
verifies its checkpoints; ``files.py`` is the only place the page's files come from (copies in
the server's own temp dir); ``sampling.py`` keeps loaded models and runs one model call at a
time; ``app.py`` is the Gradio page.
"""
