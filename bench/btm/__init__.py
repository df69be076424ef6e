"""The BTM quality benchmark (``python -m bench.btm_quality``), one module per job.

``scale`` says how big, ``recipes`` trains forests with the real ``elmtrain`` commands,
``experiments`` lays out what is trained, ``evaluate`` scores it, ``analysis`` turns scores into
the paper's claims (pure), ``report`` prints tables and draws plots.
"""
