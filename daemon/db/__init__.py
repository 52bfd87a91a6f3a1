"""Index database: schema, engine/session handling, migrations, and the queries built on them."""
