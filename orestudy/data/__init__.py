"""Data: find every readable image (images), group near-duplicates (duplicates), split (splits),
apply a person's curation (curation), decode once and make views (views). `data.X` names them all."""
from .curation import *  # noqa: F401,F403
from .duplicates import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
from .splits import *  # noqa: F401,F403
from .views import *  # noqa: F401,F403
