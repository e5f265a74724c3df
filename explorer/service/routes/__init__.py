"""The service's routes, one :class:`fastapi.APIRouter` per resource.

``ROUTERS`` is the order :func:`explorer.service.api.create_app` includes them (the order of
the published schema).
"""

from __future__ import annotations

from explorer.service.routes import (apps, auth, builds, datasets, exports, jobs, labelling,
                                     labels, results, search)

ROUTERS = [auth.api, datasets.router, builds.router, jobs.router, results.router,
           labels.router, labelling.router, exports.router, search.router, auth.pages, apps.router]
