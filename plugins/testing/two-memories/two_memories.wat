;; Test plugin `two-memories`: a component of two core instances, each with
;; its own linear memory. `apply` grows the first by 640 pages (40 MiB), then
;; the second by 640 pages. Under a per-job cap of 64 MiB each memory alone
;; fits, their sum does not: a host that limits each memory separately lets
;; both grow (and the plugin answers `failed`, "both memories grew to 40 MiB"), a host that
;; limits their sum stops the second growth as out of memory.
;;
;; Written by hand in the component text format (no Rust toolchain can make
;; a component with two memories); tests assemble it with the `wat` crate.
;; It misbehaves on purpose so the host's sandbox can be tested; never
;; deploy it.
(component
  ;; The contract's types, imported the way every plugin imports them.
  (type $types-t (instance
    (type $image (record (field "width" u32) (field "height" u32) (field "pixels" (list u8))))
    (export "image" (type $image-e (eq $image)))
    (type $kind (enum "float" "integer" "boolean" "text"))
    (export "param-kind" (type $kind-e (eq $kind)))
    (type $value (variant (case "float" float64) (case "integer" s64) (case "boolean" bool) (case "text" string)))
    (export "param-value" (type $value-e (eq $value)))
    (type $range (record (field "min" (option float64)) (field "min-inclusive" bool) (field "max" (option float64)) (field "max-inclusive" bool)))
    (export "range" (type $range-e (eq $range)))
    (type $constraint (variant (case "any") (case "within" $range-e) (case "one-of" (list string))))
    (export "constraint" (type $constraint-e (eq $constraint)))
    (type $spec (record (field "name" string) (field "kind" $kind-e) (field "default" $value-e) (field "allowed" $constraint-e) (field "description" string)))
    (export "param-spec" (type $spec-e (eq $spec)))
    (type $meta (record (field "name" string) (field "version" string) (field "description" string) (field "params" (list $spec-e))))
    (export "plugin-metadata" (type $meta-e (eq $meta)))
    (type $param (record (field "name" string) (field "value" $value-e)))
    (export "param" (type $param-e (eq $param)))
    (type $ferr (variant (case "invalid-params" string) (case "unsupported-input" string) (case "failed" string)))
    (export "filter-error" (type $ferr-e (eq $ferr)))
  ))
  (import "imgflow:filter/types@0.1.0" (instance $types (type $types-t)))
  (alias export $types "image" (type $image))
  (alias export $types "plugin-metadata" (type $meta))
  (alias export $types "param" (type $param))
  (alias export $types "filter-error" (type $ferr))

  ;; The second core instance: a memory of its own, and a way to grow it.
  (core module $Spare
    (memory (export "memory") 1)
    (func (export "grow") (param $pages i32) (result i32)
      (memory.grow (local.get $pages))))
  (core instance $spare (instantiate $Spare))

  ;; The plugin itself, with the first memory.
  (core module $Main
    (import "spare" "grow" (func $grow_spare (param i32) (result i32)))
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    (data (i32.const 16) "two-memories")
    (data (i32.const 32) "0.1.0")
    (data (i32.const 48) "Test plugin: grows two memories to 40 MiB each in apply.")
    (data (i32.const 160) "both memories grew to 40 MiB")
    ;; A bump allocator: enough for the host to pass an image in.
    (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
        (then
          (if (i32.eq (i32.const -1)
                (memory.grow
                  (i32.add
                    (i32.shr_u
                      (i32.sub (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
                      (i32.const 16))
                    (i32.const 1))))
            (then (unreachable)))))
      (local.get $p))
    ;; metadata(): name, version, description, no parameters.
    (func (export "metadata") (result i32)
      (i32.store (i32.const 256) (i32.const 16))
      (i32.store (i32.const 260) (i32.const 12))
      (i32.store (i32.const 264) (i32.const 32))
      (i32.store (i32.const 268) (i32.const 5))
      (i32.store (i32.const 272) (i32.const 48))
      (i32.store (i32.const 276) (i32.const 56))
      (i32.store (i32.const 280) (i32.const 0))
      (i32.store (i32.const 284) (i32.const 0))
      (i32.const 256))
    ;; apply(image, params): 40 MiB in each memory, then err(failed(...)).
    (func (export "apply") (param i32 i32 i32 i32 i32 i32) (result i32)
      (drop (call $grow_spare (i32.const 640)))
      (drop (memory.grow (i32.const 640)))
      (i32.store8 (i32.const 512) (i32.const 1))
      (i32.store8 (i32.const 516) (i32.const 2))
      (i32.store (i32.const 520) (i32.const 160))
      (i32.store (i32.const 524) (i32.const 28))
      (i32.const 512)))
  (core instance $main (instantiate $Main (with "spare" (instance $spare))))

  (alias core export $main "memory" (core memory $mem))
  (alias core export $main "cabi_realloc" (core func $realloc))
  (alias core export $main "metadata" (core func $metadata-core))
  (alias core export $main "apply" (core func $apply-core))
  (type $metadata-t (func (result $meta)))
  (func $metadata (type $metadata-t)
    (canon lift (core func $metadata-core) (memory $mem) (realloc $realloc) string-encoding=utf8))
  (export "metadata" (func $metadata))
  (type $apply-t (func (param "image" $image) (param "params" (list $param)) (result (result $image (error $ferr)))))
  (func $apply (type $apply-t)
    (canon lift (core func $apply-core) (memory $mem) (realloc $realloc) string-encoding=utf8))
  (export "apply" (func $apply))
)
