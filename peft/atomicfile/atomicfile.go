// Package atomicfile writes files so that a reader sees the old content or the new, never a
// partial file: Write replaces one file (a temporary in the same folder, synced, renamed into
// place), WriteFiles several files of a folder as one change (pending files, then a journal
// that commits them), WriteDir a whole folder. Every save in the SDK goes through it, so a crash
// mid-save loses nothing.
package atomicfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
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
	if err := recoverDir(parent, base); err != nil {
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

// recoverDir undoes what a WriteDir of parent/base killed midway left: the previous folder
// moved aside but not yet replaced is moved back, and the hidden new and old folders of crashed
// saves are removed.
func recoverDir(parent, base string) error {
	olds, _ := filepath.Glob(filepath.Join(parent, "."+base+".old-*"))
	if _, err := os.Stat(filepath.Join(parent, base)); errors.Is(err, os.ErrNotExist) && len(olds) > 0 {
		if err := os.Rename(olds[len(olds)-1], filepath.Join(parent, base)); err != nil {
			return err
		}
		olds = olds[:len(olds)-1]
	}
	tmps, _ := filepath.Glob(filepath.Join(parent, "."+base+".tmp-*"))
	for _, leftover := range append(olds, tmps...) {
		if err := os.RemoveAll(leftover); err != nil {
			return err
		}
	}
	return nil
}

// File is one file of a save that writes several (WriteFiles).
type File struct {
	Name string // the file's name in the folder (no path separators)
	Data []byte
}

// ReadFiles reads the named files of from (none when from is nil) for a WriteFiles that copies
// them beside a save (tokenizer files beside a model).
func ReadFiles(from fs.FS, names ...string) ([]File, error) {
	if from == nil {
		return nil, nil
	}
	files := make([]File, 0, len(names))
	for _, name := range names {
		data, err := fs.ReadFile(from, name)
		if err != nil {
			return nil, err
		}
		files = append(files, File{Name: name, Data: data})
	}
	return files, nil
}

// journalName is the file that commits a WriteFiles: it lists the pending files that replace
// the folder's files and the files it removes.
const journalName = ".peft-save-journal"

// journal is journalName's content.
type journal struct {
	Files  []pendingFile `json:"files"`
	Remove []string      `json:"remove,omitempty"`
}

type pendingFile struct {
	Name    string `json:"name"`
	Pending string `json:"pending"`
}

// WriteFiles replaces files in dir and removes the files named in remove, as one change that a
// kill at any instant cannot leave half done: each new file is first written beside its
// destination under a hidden pending name and synced; a journal listing them is then written
// atomically (the commit point); only then are the pending files renamed into place and the
// removals done, and the journal deleted. A save killed before the commit leaves the folder as
// it was; one killed after it is completed by the next WriteFiles or Finish (which every
// loader of the SDK calls first), so either way the folder reads as the old save or the new,
// never a mix. WriteFiles also deletes what crashed saves left behind (pending files of an
// uncommitted save, temporaries of Write). One writer per folder at a time.
func WriteFiles(dir string, files []File, remove ...string) (err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := Finish(dir); err != nil {
		return err
	}
	if err := removeLeftovers(dir); err != nil {
		return err
	}
	var j journal
	defer func() {
		if err != nil {
			for _, p := range j.Files {
				os.Remove(filepath.Join(dir, p.Pending))
			}
		}
	}()
	for _, f := range files {
		if f.Name == "" || f.Name != filepath.Base(f.Name) || strings.HasPrefix(f.Name, ".") {
			return fmt.Errorf("atomicfile.WriteFiles: %q is not a plain file name", f.Name)
		}
		tmp, err := os.CreateTemp(dir, "."+f.Name+".pending-*")
		if err != nil {
			return err
		}
		j.Files = append(j.Files, pendingFile{Name: f.Name, Pending: filepath.Base(tmp.Name())})
		err = writeSynced(tmp, f.Data)
		if err != nil {
			return err
		}
	}
	j.Remove = remove
	data, err := json.Marshal(j)
	if err != nil {
		return err
	}
	crashPoint("before commit")
	if err := Write(filepath.Join(dir, journalName), data); err != nil {
		return err
	}
	crashPoint("after commit")
	return Finish(dir)
}

// crashPoint lets tests stop a save at a given point, as a kill would (it panics there).
var crashPoint = func(string) {}

// writeSynced writes data to f, syncs and closes it, with mode 0644.
func writeSynced(f *os.File, data []byte) error {
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", f.Name(), err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("syncing %s: %w", f.Name(), err)
	}
	return f.Close()
}

// Finish completes a WriteFiles that was committed in dir but cut short (it renames the pending
// files that remain into place, does the removals and deletes the journal). Without a journal
// it does nothing. It is safe to run again, and by several processes at once.
func Finish(dir string) error {
	data, err := os.ReadFile(filepath.Join(dir, journalName))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("atomicfile: reading %s's save journal: %w", dir, err)
	}
	var j journal
	if err := json.Unmarshal(data, &j); err != nil {
		return fmt.Errorf("atomicfile: %s's save journal is damaged: %w", dir, err)
	}
	for _, p := range j.Files {
		if p.Name != filepath.Base(p.Name) || p.Pending != filepath.Base(p.Pending) {
			return fmt.Errorf("atomicfile: %s's save journal names a file outside the folder", dir)
		}
		err := os.Rename(filepath.Join(dir, p.Pending), filepath.Join(dir, p.Name))
		if err != nil && !errors.Is(err, os.ErrNotExist) { // gone: renamed already
			return fmt.Errorf("atomicfile: completing the save in %s: %w", dir, err)
		}
		crashPoint("after renaming " + p.Name)
	}
	for _, name := range j.Remove {
		if name != filepath.Base(name) {
			return fmt.Errorf("atomicfile: %s's save journal names a file outside the folder", dir)
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("atomicfile: completing the save in %s: %w", dir, err)
		}
	}
	syncDir(dir)
	if err := os.Remove(filepath.Join(dir, journalName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	syncDir(dir)
	return nil
}

// removeLeftovers deletes the pending files of uncommitted saves and the temporaries of
// interrupted Writes in dir (hidden files named by this package's patterns).
func removeLeftovers(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasPrefix(name, ".") || !(strings.Contains(name, ".pending-") || strings.Contains(name, ".tmp-")) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// syncDir makes renames in dir durable (best effort).
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}
