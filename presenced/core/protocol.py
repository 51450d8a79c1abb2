"""The whole client protocol under one name, for code that uses both of its halves: the
vocabulary and decoding (:mod:`presenced.core.client_wire`, :mod:`presenced.core.client_decode`)
and the server's frames (:mod:`presenced.core.client_frames`). New code imports those."""

from presenced.core.client_decode import *  # noqa: F403
from presenced.core.client_frames import *  # noqa: F403
from presenced.core.client_wire import *  # noqa: F403
