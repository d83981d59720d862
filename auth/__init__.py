"""Token verification (PyJWT) and channel permissions. Knows nothing about channels' delivery."""

from auth.permissions import PatternSet
from auth.tokens import AuthError, Claims, TokenVerifier, make_token

__all__ = ["AuthError", "Claims", "PatternSet", "TokenVerifier", "make_token"]
