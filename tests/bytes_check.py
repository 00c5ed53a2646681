"""``bytes_sent`` is what the transport counted: the arrays plus each message's
framing and JSON header. These bounds say which arrays crossed."""
import numpy as np

HEADER = 400        # the most framing + JSON one data-plane message adds to its arrays


def assert_payload(measured, payload, messages):
    """``measured`` (bytes, scalar or array) carries exactly ``payload`` bytes of
    arrays in ``messages`` messages: payload <= measured <= payload + HEADER * messages."""
    measured = np.asarray(measured, dtype=np.float64)
    assert np.all(measured >= payload), (measured, payload)
    assert np.all(measured <= payload + HEADER * messages), (measured, payload, messages)
