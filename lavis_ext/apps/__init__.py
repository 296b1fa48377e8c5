"""Applications on top of a loaded predictor (:func:`lavis_ext.inference.load`).

* :mod:`lavis_ext.apps.video`: timestamped video captions (JSON and SRT subtitles), ``lavis-ext video``;
* :mod:`lavis_ext.apps.question_packs`: a set of questions about one image with the ViT run once
  (document, chart, medical packs shipped as data files), ``lavis-ext ask``.

Optional: ``lavis_ext.register()`` never imports this package, and it imports nothing itself.
"""
