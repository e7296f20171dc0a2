"""The class of the ``hydra/launcher=local`` preset. Hydra instantiates launchers only from the ``hydra_plugins``
namespace, so it lives here; what it does is in :mod:`runners.launchers`."""

from runners.launchers import ThreadCappedLocalLauncher


class LocalLauncher(ThreadCappedLocalLauncher):
    """submitit_local whose jobs, started together, get cores // jobs threads each."""
