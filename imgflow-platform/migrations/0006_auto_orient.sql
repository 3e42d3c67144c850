-- Whether a job's input is turned upright by its EXIF orientation before
-- the plugin runs (`auto_orient`, true unless the client says false).
ALTER TABLE jobs ADD COLUMN auto_orient BOOLEAN NOT NULL DEFAULT true;
