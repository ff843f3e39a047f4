-- pgflow's optional explain helper (issue 12).
--
-- pgflow explains the statements with the most execution time with a generic plan: nothing is
-- executed, no literal is needed, never ANALYZE. PostgreSQL checks table privileges when it
-- plans, so a monitoring role without SELECT (or UPDATE, ...) on a table gets "permission
-- denied" for its plans. This SECURITY DEFINER function plans them with its owner's rights.
--
-- Install it in each database whose plans you want, as a role that may read the tables but is
-- NOT a superuser (planning can evaluate immutable functions with its owner's rights), then
-- let the monitoring role call it:
--
--   psql -d app -f explain_helper.sql
--   GRANT USAGE ON SCHEMA pgflow TO pgflow;
--   GRANT EXECUTE ON FUNCTION pgflow.explain_generic(text) TO pgflow;
--
-- `pgflow check` says whether it is installed and usable. Tables are looked up in `public`:
-- edit the function's search_path below if yours live elsewhere.

CREATE SCHEMA IF NOT EXISTS pgflow;
REVOKE ALL ON SCHEMA pgflow FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.explain_generic(query text) RETURNS json
LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER
SET search_path = pg_catalog, public
AS $fn$
DECLARE
    statement text := btrim(query, E' \t\r\n;');
    plan json;
    params int;
BEGIN
    -- Only inside the caller's read-only transaction, only one plannable statement.
    IF current_setting('transaction_read_only') <> 'on' THEN
        RAISE EXCEPTION 'pgflow.explain_generic runs only inside a read-only transaction';
    END IF;
    IF position(';' IN statement) > 0 THEN
        RAISE EXCEPTION 'pgflow.explain_generic explains exactly one statement';
    END IF;
    IF statement !~* '^(select|insert|update|delete|merge|with|values|table)\M' THEN
        RAISE EXCEPTION 'pgflow.explain_generic explains only SELECT, INSERT, UPDATE, DELETE and MERGE';
    END IF;
    IF current_setting('server_version_num')::int >= 160000 THEN
        EXECUTE 'EXPLAIN (GENERIC_PLAN, FORMAT JSON) ' || statement INTO plan;
    ELSE
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);  -- this transaction only
        IF EXISTS (SELECT 1 FROM pg_prepared_statements WHERE name = 'pgflow_helper_stmt') THEN
            EXECUTE 'DEALLOCATE pgflow_helper_stmt';
        END IF;
        EXECUTE 'PREPARE pgflow_helper_stmt AS ' || statement;
        BEGIN
            SELECT coalesce(cardinality(parameter_types), 0) INTO params
              FROM pg_prepared_statements WHERE name = 'pgflow_helper_stmt';
            EXECUTE 'EXPLAIN (FORMAT JSON) EXECUTE pgflow_helper_stmt'
                    || CASE WHEN params > 0
                            THEN '(' || array_to_string(array_fill('NULL'::text, ARRAY[params]), ', ') || ')'
                            ELSE '' END
               INTO plan;
        EXCEPTION WHEN OTHERS THEN
            EXECUTE 'DEALLOCATE pgflow_helper_stmt';  -- PREPARE is not undone by a rollback
            RAISE;
        END;
        EXECUTE 'DEALLOCATE pgflow_helper_stmt';
    END IF;
    RETURN plan;
END
$fn$;

REVOKE ALL ON FUNCTION pgflow.explain_generic(text) FROM PUBLIC;
