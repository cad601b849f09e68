//! `/api/openapi.json`: the OpenAPI 3.1 document, written from
//! [`crate::rest::ROUTES`] and the Rust types of the bodies, queries and
//! answers (their JSON Schemas from `schemars`, which OpenAPI 3.1 takes
//! as they are). Nothing in it is written by hand but the summaries.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use crate::rest::{CommandBody, ConfigValues, ErrorBody, HistoryParams, StateQuery, StateSnapshot, ROUTES};

/// The document.
pub fn document() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let mut named: Map<String, Value> = Map::new();
    let mut add = |name: &str, schema: schemars::Schema| {
        named.insert(name.to_owned(), schema.to_value());
    };
    add("CommandBody", generator.subschema_for::<CommandBody>());
    add("StateQuery", generator.subschema_for::<StateQuery>());
    add("HistoryParams", generator.subschema_for::<HistoryParams>());
    add("StateSnapshot", generator.subschema_for::<StateSnapshot>());
    add("ErrorBody", generator.subschema_for::<ErrorBody>());
    add("ConfigValues", generator.subschema_for::<ConfigValues>());
    add(
        "Scenario",
        generator.subschema_for::<majordome_scenario::model::Scenario>(),
    );
    let mut schemas: Map<String, Value> = generator
        .definitions()
        .iter()
        .map(|(name, schema)| (name.clone(), schema.clone()))
        .collect();
    // Types referred to by name are in `definitions`; the others inline.
    for (name, schema) in &named {
        if !schemas.contains_key(name) {
            schemas.insert(name.clone(), schema.clone());
        }
    }

    let mut paths: Map<String, Value> = Map::new();
    for route in ROUTES {
        let mut parameters: Vec<Value> = path_parameters(route.path);
        if let Some(query) = route.query {
            parameters.extend(query_parameters(&schemas, query));
        }
        let mut operation = json!({
            "summary": route.summary,
            "operationId": operation_id(route.method, route.path),
            "responses": responses(route.answer, route.method == "post" && !route.path.contains('{')),
        });
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        if let Some(body) = route.body {
            operation["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{body}")}}}
            });
        }
        paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object")
            .insert(route.method.to_owned(), operation);
    }
    paths.insert(
        "/jsonrpc".into(),
        json!({"post": {
            "summary": "JSON-RPC 2.0 (agorpc): message, subscribe, getevent, unsubscribe, call; batches",
            "operationId": "jsonrpc",
            "requestBody": {"required": true, "content": {"application/json": {"schema": {}}}},
            "responses": {
                "200": {"description": "The response object, or an array for a batch",
                        "content": {"application/json": {"schema": {}}}},
                "204": {"description": "Only notifications: no answer"},
                "415": error_response("The body is not sent as application/json"),
                "401": error_response("No valid token where one is needed"),
            }
        }}),
    );
    paths.insert(
        "/metrics".into(),
        json!({"get": {
            "summary": "Prometheus metrics (OpenMetrics text)",
            "operationId": "metrics",
            "responses": {
                "200": {"description": "Every counter `majordome status` shows",
                        "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}},
                "401": error_response("No valid token where one is needed"),
            }
        }}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "majordome HTTP gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "REST, JSON-RPC and metrics of a majordome hub. Send `Authorization: Bearer <token>` \
                            (`majordome token create NAME`) unless the gateway lets local clients in.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": paths,
    })
}

fn error_response(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
}

/// Every answer a route may give; a POST to a collection (`makes`) makes
/// an item whose name may be taken.
fn responses(answer: Option<&str>, makes: bool) -> Value {
    let schema = match answer {
        Some(name) => json!({"$ref": format!("#/components/schemas/{name}")}),
        None => json!({}),
    };
    let mut responses = json!({
        "200": {"description": "The service's answer", "content": {"application/json": {"schema": schema}}},
        "400": error_response("A bad request, or one the service refused, with why"),
        "401": error_response("No valid token where one is needed"),
        "403": error_response("The identity may not do this"),
        "404": error_response("No such device, route or item"),
        "413": error_response("The body is too large"),
        "502": error_response("The bus could not be reached"),
        "503": error_response("The service does not run"),
        "504": error_response("The service did not answer in time"),
    });
    if makes {
        responses["409"] = error_response("The name is taken: update that item instead");
    }
    responses
}

/// `{uuid}` and the like, each a required string.
fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect()
}

/// A query type's properties, each an optional query parameter.
fn query_parameters(schemas: &Map<String, Value>, name: &str) -> Vec<Value> {
    let properties = schemas
        .get(name)
        .and_then(|schema| schema.get("properties"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    properties
        .into_iter()
        .map(|(property, schema)| json!({"name": property, "in": "query", "required": false, "schema": schema}))
        .collect()
}

fn operation_id(method: &str, path: &str) -> String {
    let words: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != "api")
        .map(|s| s.trim_start_matches('{').trim_end_matches('}'))
        .collect();
    format!("{method}_{}", words.join("_"))
}

/// A type's schema on its own, for tests.
pub fn schema_of<T: JsonSchema>() -> Value {
    SchemaSettings::openapi3()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_document_with_its_parameters_and_bodies() {
        let document = document();
        for route in ROUTES {
            let operation = &document["paths"][route.path][route.method];
            assert!(operation.is_object(), "{} {}", route.method, route.path);
            if route.path.contains("{uuid}") {
                assert!(operation["parameters"].to_string().contains("\"uuid\""), "{operation}");
            }
        }
        let command = &document["paths"]["/api/devices/{uuid}/command"]["post"];
        let reference = command["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap();
        let name = reference.rsplit('/').next().unwrap();
        let schema = &document["components"]["schemas"][name];
        assert!(schema["properties"]["command"].is_object(), "{schema}");
        let history = document["paths"]["/api/history/{uuid}/{quantity}"]["get"]["parameters"].to_string();
        assert!(
            history.contains("\"from\"") && history.contains("\"bucket\""),
            "{history}"
        );
        assert!(schema_of::<CommandBody>()["properties"]["data"].is_object());
    }
}
