//! A connection that prepared a statement before a migration changed its
//! table is not reused after the migrations are marked run
//! ([`imgflow_platform::db::Migrated`]): the API serves while it migrates,
//! and PostgreSQL refuses such a cached statement for as long as its
//! connection lives ("cached plan must not change result type", seen as
//! `database_unavailable` on `/v1/plugins` in a test run).

use imgflow_platform::db::{connect_lazy, Migrated};
use imgflow_testkit::stack::Stack;

#[tokio::test]
async fn connections_from_before_the_migrations_are_not_reused() {
    let stack = Stack::new().await;
    let migrated = Migrated::default();
    // One connection, so every query runs on the same one.
    let pool = connect_lazy(&stack.db_url, 1, &migrated).unwrap();
    sqlx::query("CREATE TABLE t (a int)")
        .execute(&pool)
        .await
        .unwrap();
    let read = || sqlx::query("SELECT * FROM t").fetch_all(&pool);
    read().await.unwrap(); // prepared and cached on the connection
    sqlx::query("ALTER TABLE t ADD COLUMN b int")
        .execute(&pool)
        .await
        .unwrap();
    let stale = read().await.unwrap_err().to_string();
    assert!(stale.contains("cached plan"), "{stale}");

    migrated.mark();
    read().await.expect("a new connection, with nothing cached");
    read().await.expect("and it is reused");
}
