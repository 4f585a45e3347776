//! REST handlers for `vm.heki*`.

use crate::api::{ApiError, ApiRequest, ApiResult};
use crate::vmm::Vmm;

pub(crate) fn handle(_vmm: &mut Vmm, _request: ApiRequest) -> ApiResult {
    Err(ApiError::NotFound("heki is not wired yet".into()))
}
