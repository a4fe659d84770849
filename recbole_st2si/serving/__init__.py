"""Serving a saved run (the command line is :mod:`recbole_st2si.recommend`).

* :mod:`~recbole_st2si.serving.recommender`: :func:`load_recommender` builds the run's model again
  from its checkpoint and serving file; :class:`Recommender` and :class:`Session` answer requests.
* :mod:`~recbole_st2si.serving.backends`: how each kind of model ranks items, chosen once at load time.
* :mod:`~recbole_st2si.serving.sessions`: ST2SI's incremental encoding of growing histories.
"""

from recbole_st2si.serving.recommender import Recommender, Session, TopK, load_recommender

__all__ = ["Recommender", "Session", "TopK", "load_recommender"]
