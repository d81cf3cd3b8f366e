//! The Responses API is refused up front: the upstreams Iris targets do not
//! all implement it, and a clear error beats a confusing upstream one.

use crate::error::ApiError;

pub async fn reject() -> ApiError {
    ApiError::unsupported_api()
}
