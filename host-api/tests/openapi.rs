//! The OpenAPI document (docs/openapi.yaml) lists exactly the API's routes.

use std::path::PathBuf;

fn read(path: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let source = read("src/routes.rs");
    let routes: Vec<&str> = source
        .split(".route(")
        .skip(1)
        .map(|rest| {
            rest.trim_start()
                .trim_start_matches('"')
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert!(routes.len() >= 6, "{routes:?}");
    let spec = read("../docs/openapi.yaml");
    let documented: Vec<&str> = spec
        .lines()
        .filter(|l| l.starts_with("  /") && l.ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':'))
        .collect();
    let mut a = routes.clone();
    let mut b = documented.clone();
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "routes in src/routes.rs vs paths in docs/openapi.yaml"
    );
}
