"""Operations: the authenticated admin API (twisted.web) and the ``exmta queue`` / ``exmta track`` commands."""
