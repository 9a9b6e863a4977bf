"""ESMTP on the wire: the sans-IO parser (wire), replies, parameters, the server and the client."""
