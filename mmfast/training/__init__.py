"""Training: one DeepSpeed engine (:mod:`.engine`, :mod:`.checkpoint`, :mod:`.dsconfig`, :mod:`.data`)
and thin recipes that say model, data and loss (:mod:`.clip`, :mod:`.llava`, :mod:`.nextgpt`), started by
``mmfast train`` (:mod:`.launch`). Nothing here is imported by the rest of the library."""
