//! `GET /v1/models` and `GET /v1/models/{id}`: the models the calling client
//! may use, in OpenAI's list and object shapes.

use axum::Json;
use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use serde::Serialize;

use super::Authenticated;
use crate::catalog::Model;
use crate::error::ApiError;

#[derive(Serialize)]
pub struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

impl<'a> From<&'a Model> for ModelObject<'a> {
    fn from(model: &'a Model) -> Self {
        Self {
            id: &model.name,
            object: "model",
            created: 0,
            owned_by: &model.primary().name,
        }
    }
}

#[derive(Serialize)]
pub struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

pub async fn list(Authenticated { client, config }: Authenticated) -> Json<serde_json::Value> {
    let list = ModelList {
        object: "list",
        data: config
            .catalog
            .models_for(&client)
            .map(ModelObject::from)
            .collect(),
    };
    Json(serde_json::to_value(list).unwrap_or_default())
}

pub async fn retrieve(
    Authenticated { client, config }: Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id.map_err(|e| {
        ApiError::invalid_request(format!("The model id in the path is invalid: {e}."))
            .with_param("model")
    })?;
    let model = config
        .catalog
        .model(&id)
        .ok_or_else(|| ApiError::model_not_found(&id))?;
    if !client.may_use(&model.name) {
        return Err(ApiError::model_not_allowed(&id));
    }
    Ok(Json(
        serde_json::to_value(ModelObject::from(model)).unwrap_or_default(),
    ))
}
