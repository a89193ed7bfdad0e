"""Central differential privacy: Flower's DP strategy wrappers around the configured strategy, and the budget.

``federated.dp`` chooses the wrapper: ``server-fixed`` (the server clips every update to ``dp-clipping-norm``),
``client-fixed`` (each client clips its own update with Flower's ``fixedclipping_mod``, so an unclipped update
never leaves the device) or ``server-adaptive`` (the norm follows the ``dp-clipped-quantile`` of the updates'
norms, Andrew et al.). All add Gaussian noise of ``dp-noise-multiplier`` x the norm / the number of sampled clients
to the average of the sampled clients' clipped updates, so the average must be plain (uniform weights) and take
every sampled client: a round with a missing or rejected update is not aggregated (the model stays as it was, and
no privacy is spent).

:class:`PrivacyLedger` accounts the budget with Flower's RDP accountant: one Gaussian release per aggregated round
at client level (adding or removing one client's data), without the amplification that sampling would give (the
sampling is seeded, so it cannot be counted on to be secret), reported as epsilon at ``dp-delta``. The noise is
drawn from numpy's unseeded generator: a DP run is not reproducible from its seed, as noise that anyone could
recompute from the seed would protect nothing.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from fl.config import FederatedConfig
from fl.errors import ConfigError


def wrap_for_privacy(strategy: Strategy, fed: FederatedConfig, n_sampled: int) -> Strategy:
    """``strategy`` inside the Flower DP wrapper ``fed.dp`` names (``strategy`` itself when it is ``off``)."""
    if fed.dp == "off":
        return strategy
    if fed.dp == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, fed.dp_noise_multiplier, fed.dp_clipping_norm,
                                                          n_sampled)
    if fed.dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, fed.dp_noise_multiplier, fed.dp_clipping_norm,
                                                          n_sampled)
    # The noisy count of clipped updates shares the budget: Andrew et al.'s m / 20, but never so little that the
    # updates' own noise multiplier (z^-2 - (2 sigma_b)^-2)^-1/2 grows past 1.16 z (a few clients a round).
    count_stddev = max(n_sampled / 20, fed.dp_noise_multiplier)
    return DifferentialPrivacyServerSideAdaptiveClipping(strategy, fed.dp_noise_multiplier, n_sampled,
                                                         initial_clipping_norm=fed.dp_clipping_norm,
                                                         target_clipped_quantile=fed.dp_clipped_quantile,
                                                         clipped_count_stddev=count_stddev)


class PrivacyLedger:
    """The privacy spent by a run: one Gaussian release per aggregated round (see the module docstring)."""

    def __init__(self, fed: FederatedConfig, population: int, n_sampled: int) -> None:
        try:
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

            self.accountant = RdpAccountant(PrivacyConfig(
                target_delta=fed.dp_delta, population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION))
        except ImportError:
            raise ConfigError("federated.dp: privacy accounting needs the dp-accounting package "
                              "(pip install 'flwr[dp]')") from None
        self.delta = fed.dp_delta
        self.event = GaussianPrivacyEvent(noise_multiplier=fed.dp_noise_multiplier, sample_size=n_sampled,
                                          population_size=population)

    @property
    def releases(self) -> int:
        """Aggregated (noised) rounds so far."""
        return self.accountant.num_releases

    def release(self, count: int = 1) -> None:
        """Account ``count`` more aggregated rounds."""
        if count:
            self.accountant.compose(self.event, count)

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta (0 before the first release)."""
        return self.accountant.get_epsilon(self.delta) if self.releases else 0.0
