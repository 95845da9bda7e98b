// Package atomicfile writes files so that a reader sees the old content or the new, never a
// partial file: the data goes to a temporary file in the same folder, is synced, and is renamed
// into place. Every save in the SDK goes through it, so a crash mid-save loses nothing.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
)

// Write replaces path with data atomically. The file gets mode 0644 (os.CreateTemp would leave
// 0600). On error nothing is left behind and an existing file is untouched.
func Write(path string, data []byte) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmpName)
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", tmpName, err)
	}
	if err = tmp.Chmod(0o644); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", tmpName, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", tmpName, err)
	}
	if err = os.Rename(tmpName, path); err != nil {
		return err
	}
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync() // best effort: makes the rename durable
		d.Close()
	}
	return nil
}

// WriteDir replaces the folder dir with one that fill writes: fill gets a new folder beside dir
// and writes every file into it; only when it returns without error is the folder renamed to
// dir (an existing dir is moved aside first and then removed). A crash or error while filling
// leaves dir as it was, and at worst a hidden ".<name>.tmp-*" folder beside it.
func WriteDir(dir string, fill func(tmp string) error) (err error) {
	parent, base := filepath.Split(filepath.Clean(dir))
	if parent == "" {
		parent = "."
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(parent, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err = os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err = fill(tmp); err != nil {
		return err
	}
	if d, derr := os.Open(tmp); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	var old string
	if _, statErr := os.Stat(dir); statErr == nil {
		old = filepath.Join(parent, "."+base+".old-"+filepath.Base(tmp)[len(base)+6:])
		if err = os.Rename(dir, old); err != nil {
			return err
		}
	}
	if err = os.Rename(tmp, dir); err != nil {
		if old != "" {
			_ = os.Rename(old, dir)
		}
		return err
	}
	if old != "" {
		_ = os.RemoveAll(old)
	}
	if d, derr := os.Open(parent); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
