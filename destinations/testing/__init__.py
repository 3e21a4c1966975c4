"""Test kit for destination adapters (needs pytest): the adapter contract suite and a scriptable
local HTTP server that imitates a platform. Third-party adapters run the same suite as the
built-in ones::

    from destinations.testing.contract import ContractHarness, DestinationContract
    from destinations.testing.http_server import FakeHttpServer, ScriptedResponse
"""
